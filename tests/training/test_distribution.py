"""Multi-device training: MirroredStrategy over two logical CPU devices, mixed precision, run tags."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from spinemri.api.classifier import train
from spinemri.config import TrainConfig, load_experiment
from spinemri.data.schema import HEAD_CLASSES
from spinemri.errors import ConfigError
from spinemri.models.network import build_model
from spinemri.training.fit import distribution

ROOT = Path(__file__).resolve().parents[2]
# Logical devices must be declared before TensorFlow initialises: a fresh interpreter does it.
TWO_CPUS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from spinemri.cli import main
main(sys.argv[1:], prog_name="spinemri")
"""


def test_mirrored_training_on_two_logical_devices_logs_replicas_and_serves(phantom_dir, tracking, tmp_path):
    inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env = {**inherited, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", TWO_CPUS, "train", "--arch", "tiny", "--data-dir", str(phantom_dir),
               "--img-size", "48", "--epochs", "1", "--batch-size", "32", "--strategy", "mirrored",
               "--set", "mlflow.experiment=mirrored"]
    # cwd: a sqlite store keeps run artifacts under ./mlruns
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    client = mlflow.MlflowClient(tracking)
    [run] = client.search_runs([client.get_experiment_by_name("mirrored").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["strategy"] == "mirrored"
    assert run.data.tags["replicas"] == "2"
    assert run.data.tags["mixed_precision"] == "off"  # no GPU here: auto stays float32
    assert run.data.params["strategy"] == "mirrored"

    from spinemri.serving.classifier import load_classifier
    from spinemri.serving.inputs import file_row

    classifier = load_classifier(f"runs:/{run.info.run_id}/model")
    samples = pd.read_csv(phantom_dir / "train_label_coordinates.csv").iloc[:2]
    rows = [file_row(phantom_dir / "train_images" / str(s.study_id) / str(s.series_id) / f"{s.instance_number}.dcm",
                     s.x, s.y) for s in samples.itertuples()]
    predicted = classifier.predict(None, pd.DataFrame(rows))
    assert len(predicted) == 2
    for head, classes in HEAD_CLASSES.items():
        probabilities = predicted[[f"{head}:{c}" for c in classes]].to_numpy()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_default_strategy_is_one_replica_in_float32_and_restores_the_policy():
    before = keras.mixed_precision.global_policy().name
    with distribution(TrainConfig()) as (strategy, tags):
        assert strategy.num_replicas_in_sync == 1
        assert keras.mixed_precision.global_policy().name == "float32"
    assert tags == {"strategy": "default", "replicas": "1", "mixed_precision": "off"}
    with distribution(TrainConfig(strategy="mirrored")) as (_, tags):  # one CPU device in this process
        assert tags["replicas"] == "1"
    assert keras.mixed_precision.global_policy().name == before


def test_mixed_precision_on_without_a_gpu_is_refused_before_training(tracking):
    config = load_experiment("quick", {"arch": "tiny", "img_size": 48, "epochs": 1, "mixed_precision": "on"})
    assert config.train.mixed_precision == "on"
    with pytest.raises(ConfigError, match="mixed_precision=on needs a GPU.*auto"):
        train(config)
    assert mlflow.search_runs(search_all_experiments=True).empty  # refused before any run started


def test_bad_strategy_and_precision_values_name_the_key_and_choices():
    with pytest.raises(ConfigError, match="train.strategy must be one of default, mirrored, multiworker"):
        load_experiment("quick", {"strategy": "tpu"})
    with pytest.raises(ConfigError, match="train.mixed_precision must be one of auto, on, off"):
        load_experiment("quick", {"mixed_precision": "half"})
    assert load_experiment("quick", {"train.mixed_precision": False}).train.mixed_precision == "off"  # YAML `off`


def test_mixed_float16_keeps_the_heads_in_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("tiny", 32, 1, dense_units=8)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("dense").compute_dtype == "float16"
    outputs = model(np.zeros((2, 32, 32, 1), np.float32))
    for head in HEAD_CLASSES:
        assert model.get_layer(head).compute_dtype == "float32"
        assert outputs[head].dtype == "float32"

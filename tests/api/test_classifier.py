"""End-to-end training: `mlflow run` with the tiny backbone, what the run records, learnability,
staged fine-tuning, interrupted runs and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
import signal
import re
import subprocess
import sys
import time

from click.testing import CliRunner
import mlflow
import numpy as np
import pytest

from spinemri.api.classifier import train
from spinemri.cli import main as cli
from spinemri.config import SHORTCUTS, load_experiment
from spinemri.data.schema import CONDITIONS, HEAD_CLASSES
from spinemri.metrics import operating
from spinemri.metrics.heads import METRICS
from spinemri.tracking.store import open_tracking_store

ROOT = Path(__file__).resolve().parents[2]
HEADS = tuple(HEAD_CLASSES)


def _env(tracking_uri: str) -> dict:
    inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    return {**inherited, "MLFLOW_TRACKING_URI": tracking_uri,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _runs(tracking_uri: str, experiment: str):
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([found.experiment_id]) if found else [])


def test_mlflow_run_trains_and_records_everything(phantom40, tracking):
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name",
               "e2e", "-P", "arch=tiny", "-P", f"data_dir={phantom40}", "-P", "img_size=48", "-P", "epochs=2",
               "-P", "batch_size=32", "-P", "set=mlflow.system_metrics_interval=1"]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(tracking), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    client, runs = _runs(tracking, "e2e")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    # A quiet terminal: nothing about CUDA on a machine without a GPU, no library warning, no download bar;
    # a line per epoch; the summary opens on the verdict and ends on the run's page in the model-training view.
    lines = (done.stdout + done.stderr).splitlines()
    noise = [line for line in lines if re.search(r"cuInit|CUDA|cuda|oneDNN|Downloading artifacts|Warning|WARNING|"
                                                 r"Successfully registered model|Created version", line)]
    assert noise == [], "\n".join(noise)
    assert [line for line in lines if re.match(r"epoch \d/2: loss ", line)], lines
    # the steps after the last epoch say what they do
    assert [line for line in lines if line.startswith("  evaluating on the test split: ")], lines
    assert "  logging the model" in lines, lines
    out = done.stdout.splitlines()
    first = next(i for i, line in enumerate(out) if "the per-site prior" in line and line.split()[0] in
                 ("Better", "Worse", "Not", "No"))
    summary = out[first:]
    assert len(summary) <= 12 and summary[1].startswith(f"run {run.info.run_id} finished"), summary
    assert summary[-1].startswith("MLflow UI: http") and f"/runs/{run.info.run_id}?workflowType=machine_learning" \
        in summary[-1], summary
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["mlflow.runName"].startswith("tiny-")
    for tag in ("git_commit", "data_fingerprint", "device", "version.tensorflow", "version.mlflow", "version.keras"):
        assert run.data.tags.get(tag), tag
    # One param per setting: the -P names, resolved; no section the task does not read.
    params = run.data.params
    assert params["arch"] == "tiny" and params["epochs"] == "2" and params["img_size"] == "48"
    assert params["experiment"] == "quick" and params["train.optimizer"] == "adam" and params["weights"] == "none"
    assert not {"model.arch", "train.epochs", "preprocess.img_size", "name"} & set(params)
    assert not [k for k in params if k.split(".")[0] in ("localize", "compare", "tuning", "trial")]
    assert params["mode"] == "roi" and params["preprocess.slices"] == "1"  # not given: the experiment's, resolved
    assert not [k for k, v in params.items() if v == "" and k in SHORTCUTS]
    # The data it saw: three dataset inputs with the cache's content digest and per-split counts.
    inputs = {[t.value for t in i.tags if t.key == "mlflow.data.context"][0]: i.dataset
              for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test"}
    assert {d.name for d in inputs.values()} == {f"{phantom40.name}-{s}" for s in ("train", "val", "test")}
    assert len({d.digest for d in inputs.values()}) == 1 and len(inputs["training"].digest) == 20
    profiles = {k: json.loads(d.profile) for k, d in inputs.items()}
    assert profiles["training"]["samples"] > profiles["test"]["samples"] > 0 and profiles["test"]["studies"] >= 3
    assert json.loads(inputs["test"].source)["uri"] == str(phantom40.resolve())

    # Headline metrics, not every breakdown: about a hundred (the model's, and its floor's headline beside
    # them), plus MLflow's system metrics, plus the run page's first group: rounded copies of the headline.
    own = [k for k in run.data.metrics if not k.startswith(("system/", "headline/"))]
    assert 60 <= len(own) <= 105, sorted(own)
    headline = {k.removeprefix("headline/"): v for k, v in run.data.metrics.items() if k.startswith("headline/")}
    assert list(headline) and set(headline) <= set(own), sorted(headline)
    assert {"test_severity_weighted_log_loss", "test_floor_severity_weighted_log_loss", "test_vs_floor",
            *[f"test_{h}_roc_auc" for h in HEADS]} <= set(headline), sorted(headline)
    assert all(value == round(run.data.metrics[name], 4) for name, value in headline.items())
    assert {"test_floor_severity_weighted_log_loss", "test_vs_floor", "test_vs_floor_ci_low"} <= set(own)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert "test_severity_weighted_log_loss_ci_low" in own and not [k for k in own if k.endswith(("_majority", "_prior"))]

    metrics = run.data.metrics
    for head in HEADS:
        for name in METRICS:
            assert np.isfinite(metrics[f"test_{head}_{name}"]), (head, name)
    for name in ("test_severity_weighted_log_loss", "training_time_s", "epochs_trained"):
        assert name in metrics
    assert metrics["epochs_trained"] == 2
    for key in ("loss", "val_loss", "lr", *[f"val_{h}_accuracy" for h in HEADS]):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    history = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/training/history.json")
    assert {f"{h}_accuracy" for h in HEADS} <= set(history["columns"]) and len(history["data"]) == 2

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    for folder in ("plots", "reports", "data"):
        artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, folder)}
    expected = {"config.yaml", "data/splits.csv", "plots/training_curves.png", "plots/test_predictions.png",
                *[f"plots/confusion_{h}.png" for h in HEADS], *[f"plots/roc_{h}.png" for h in HEADS],
                *[f"reports/classification_report_{h}.txt" for h in HEADS]}
    assert expected <= artifacts, expected - artifacts

    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(models) == 1
    loaded = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
    assert loaded.metadata.signature is not None
    example = loaded.input_example
    predictions = loaded.predict(example)
    assert list(predictions.columns[:3]) == list(HEADS)
    # the referral thresholds, chosen on the validation split, travel with the model: the served flag is
    # them applied to the served probability of the row's condition
    carried = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{operating.ARTIFACT}")
    assert carried["fitted_on"] == "val" and set(carried["points"]) == set(operating.POINTS)
    named = example["condition"].tolist() if "condition" in example else [None] * len(predictions)
    graded = [c if c in CONDITIONS else p for c, p in zip(named, predictions["condition"])]
    severity = predictions[[f"severity:{c}" for c in HEAD_CLASSES["severity"]]].to_numpy()
    assert predictions["refer"].tolist() == operating.refer(carried["points"], graded, severity).tolist()
    for head, classes in HEAD_CLASSES.items():
        probabilities = predictions[[f"{head}:{c}" for c in classes]].to_numpy()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        assert predictions[head].iloc[0] in classes


@pytest.mark.slow  # the two-stage classifier (tests/study) checks learnability at 64 px in half the time
def test_the_phantom_is_learnable_with_the_quick_profile(phantom40, tracking):
    # The quick profile with the tiny backbone, which needs more epochs than densenet; the best
    # checkpoint is chosen on the severity head's validation loss (a monitor Keras cannot orient itself).
    config = load_experiment("quick", {"arch": "tiny", "data_dir": str(phantom40), "epochs": 12,
                                       "train.monitor": "val_severity_loss", "train.early_stopping_patience": 20})
    result = train(config, log_model=False)
    # Seen here over three runs (CPU training is not bit-reproducible): severity macro ROC-AUC 0.72-0.83,
    # condition 0.88-0.94. Densenet with the plain quick profile (6 epochs): severity 0.89-0.94.
    assert result.metrics["test_severity_roc_auc"] > 0.6, result.metrics
    assert result.metrics["test_condition_roc_auc"] > 0.75, result.metrics


def test_staged_fine_tuning_lowers_the_learning_rate(phantom_dir, tracking):
    config = load_experiment("quick", {"arch": "tiny", "data_dir": str(phantom_dir), "img_size": 32, "epochs": 2,
                                       "train.freeze_epochs": 1, "train.fine_tune_lr_factor": 0.1, "lr": 0.002})
    result = train(config, log_model=False)
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "lr")
    assert [round(m.value, 6) for m in sorted(history, key=lambda m: m.step)] == [0.002, 0.0002]


def test_deterministic_training_repeats_its_run_exactly(phantom_dir, tracking):
    # train.deterministic turns on TensorFlow's op determinism (for the rest of this process): the
    # same seed then gives the same weights, so the same metrics, bit for bit.
    overrides = {"arch": "tiny", "data_dir": str(phantom_dir), "img_size": 32, "epochs": 2, "lr": 0.002,
                 "train.deterministic": True, "storage": "postgresql://alice:s3cret@db.example/optuna"}
    first, second = (train(load_experiment("quick", overrides), log_model=False) for _ in range(2))
    assert first.run_id != second.run_id
    timings = {"training_time_s", "inference_ms_per_image"}
    assert {k: v for k, v in first.metrics.items() if k not in timings} == \
        {k: v for k, v in second.metrics.items() if k not in timings}
    assert first.history == second.history
    client = mlflow.MlflowClient()
    digests = [client.get_run(result.run_id).data.tags["weights_sha256"] for result in (first, second)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]  # the same weights, bit for bit
    params = client.get_run(first.run_id).data.params
    assert params["train.deterministic"] == "True" and params["seed"] == "0"
    # A password in a URL setting is masked in the logged config.yaml (a tuning study's params: tests/api/test_tune.py).
    assert "s3cret" not in mlflow.artifacts.load_text(f"runs:/{first.run_id}/config.yaml")


def _default_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# SIGINT takes SIGTERM's path (both become KeyboardInterrupt in ending_run): checked in the slow run.
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGKILL])
def test_interrupted_training_ends_killed_not_running(phantom_dir, tracking, sig):
    command = [sys.executable, "-m", "spinemri", "train", "--arch", "tiny", "--data-dir", str(phantom_dir),
               "--img-size", "32", "--epochs", "200", "--set", "train.early_stopping_patience=500",
               "--set", "mlflow.experiment=interrupt"]
    # As from a terminal: SIGINT neither ignored nor blocked in the child, whatever this test
    # worker's threads did to their own signal state (both are inherited across fork and exec).
    process = subprocess.Popen(command, env=_env(tracking), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=_default_signals)
    deadline = time.monotonic() + 240
    open_tracking_store(tracking)  # this process and the child may both be the first to open the new store
    client = mlflow.MlflowClient(tracking)
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        _, runs = _runs(tracking, "interrupt")
        if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
            break
        time.sleep(0.5)
    status = Path(f"/proc/{process.pid}/status")
    masks = [line for line in status.read_text().splitlines() if line.startswith("Sig")] if status.exists() else []
    process.send_signal(sig)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"training ignored {sig!r} for 60 s; its signal masks were {masks}")
    assert process.returncode != 0
    _, runs = _runs(tracking, "interrupt")
    if sig != signal.SIGKILL:
        assert [r.info.status for r in runs] == ["KILLED"]
        return
    # SIGKILL (an OOM kill) ends nothing: the next command that opens the store marks the run FAILED.
    assert [r.info.status for r in runs] == ["RUNNING"]
    open_tracking_store(tracking)
    _, runs = _runs(tracking, "interrupt")
    assert [r.info.status for r in runs] == ["FAILED"] and "died" in runs[0].data.tags["fail_reason"]


@pytest.mark.parametrize("args, message", [
    (["--arch", "denset"], "unknown arch 'denset'; choose one of: inception_v3"),
    (["--epochs", "-1"], "epochs must be an integer >= 1"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1"),
    (["--arch", "inception_v3", "--img-size", "64"], "below the minimum of 75 px for inception_v3"),
    (["--mode", "cube"], "mode must be one of roi, slice"),
    (["--lr", "abc"], "lr must be a finite number"),
])
def test_bad_parameters_fail_before_any_run(args, message, tracking):
    result = CliRunner().invoke(cli, ["train", *args, "--set", "mlflow.experiment=bad"])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert _runs(tracking, "bad")[1] == []


def test_bad_data_dir_fails_with_its_name(tmp_path, tracking):
    empty = tmp_path / "empty"
    empty.mkdir()
    for data_dir, message in ((empty, "no train.csv"), (tmp_path / "nowhere", "does not exist")):
        result = CliRunner().invoke(cli, ["train", "--arch", "tiny", "--data-dir", str(data_dir),
                                          "--set", "mlflow.experiment=bad"])
        assert result.exit_code == 1, result.output
        assert message in result.output and str(data_dir) in result.output
    assert all(r.info.status != "RUNNING" for r in _runs(tracking, "bad")[1])


def test_a_dataset_without_labelled_samples_is_refused(tmp_path, tracking):
    from spinemri.phantom import PhantomConfig, synthesize

    blank = tmp_path / "blank"
    synthesize(blank, PhantomConfig(studies=3, seed=0, p_blank=1.0, image_sizes=(64,), median_sagittal_slices=9))
    result = CliRunner().invoke(cli, ["train", "--arch", "tiny", "--data-dir", str(blank),
                                      "--set", "mlflow.experiment=bad"])
    assert result.exit_code == 1
    assert f"{blank} has no labelled samples" in result.output


def test_mlflow_run_with_a_bad_parameter_leaves_a_failed_run(tracking):
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name",
               "bad-run", "-P", "arch=denset"]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(tracking), timeout=300)
    assert done.returncode != 0
    assert "unknown arch 'denset'" in done.stderr + done.stdout
    assert [r.info.status for r in _runs(tracking, "bad-run")[1]] == ["FAILED"]

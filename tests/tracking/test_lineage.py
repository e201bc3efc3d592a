"""Dataset lineage: the content digest of a prepared cache, the same for the same data wherever it lies."""

from __future__ import annotations

import json
import shutil

import mlflow
import pandas as pd

from spinemri.config import load_experiment
from spinemri.data import cache
from spinemri.data.preprocess import PreprocessConfig
from spinemri.tracking.lineage import data_name, log_splits

PRE = PreprocessConfig(img_size=32)


def test_the_same_data_has_the_same_digest_and_other_data_another(phantom_dir, tmp_path):
    first = cache.prepare(phantom_dir, PRE, cache_dir=tmp_path / "a")
    # A copy elsewhere, with new modification times: another cache folder, the same content.
    moved = tmp_path / "copy" / "data"
    shutil.copytree(phantom_dir, moved, copy_function=shutil.copy)
    second = cache.prepare(moved, PRE, cache_dir=tmp_path / "b")
    assert first.fingerprint != second.fingerprint and first.content_digest == second.content_digest
    assert len(first.content_digest) == 20

    # One grade changed: other data, another digest; other preprocessing: another digest.
    labels = pd.read_csv(moved / "train.csv")
    column = next(c for c in labels.columns if c != "study_id")
    labels.loc[0, column] = "Severe" if labels.loc[0, column] != "Severe" else "Normal/Mild"
    labels.to_csv(moved / "train.csv", index=False)
    assert cache.prepare(moved, PRE, cache_dir=tmp_path / "b").content_digest != first.content_digest
    assert cache.prepare(phantom_dir, PreprocessConfig(img_size=40), cache_dir=tmp_path / "a").content_digest \
        != first.content_digest


def test_a_cache_without_a_recorded_digest_gets_one_once(phantom_dir, tmp_path):
    built = cache.prepare(phantom_dir, PRE, cache_dir=tmp_path)
    manifest = json.loads((built.path / "manifest.json").read_text())
    digest = manifest.pop("content_digest")
    (built.path / "manifest.json").write_text(json.dumps(manifest))  # as an older version wrote it
    reused = cache.prepare(phantom_dir, PRE, cache_dir=tmp_path)
    assert reused.reused and reused.content_digest == digest
    assert json.loads((built.path / "manifest.json").read_text())["content_digest"] == digest


def test_each_split_is_one_dataset_input_named_after_the_data(phantom_dir, tracking):
    config = load_experiment("quick", {"data_dir": str(phantom_dir)})
    assert data_name(config.data) == phantom_dir.name
    assert data_name(load_experiment("quick", {"data.phantom_studies": 12}).data) == "phantom-12-studies-seed0"
    rows = pd.DataFrame({"study_id": [1, 1, 2, 3], "x": range(4)})
    mlflow.set_experiment("lineage")
    with mlflow.start_run() as run:
        log_splits(config.data, config.split, str(phantom_dir), "0123456789abcdef0123",
                   {"train": rows[:3], "test": rows[3:]})
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    found = {i.tags[0].value: i.dataset for i in inputs}
    assert set(found) == {"training", "test"}
    assert found["training"].name == f"{phantom_dir.name}-train" and found["training"].digest == "0123456789abcdef0123"
    assert json.loads(found["training"].profile)["studies"] == 2 and json.loads(found["test"].profile)["samples"] == 1
    assert json.loads(found["test"].source)["uri"] == str(phantom_dir)

"""`spinemri evaluate` on a real training run: the report logged into the finished run, and refusals."""

from __future__ import annotations

import os
from pathlib import Path
import re
import shutil
import warnings

import mlflow
import numpy as np
import pandas as pd
import pytest

from spinemri.api.evaluate import evaluate_run
from spinemri.config import load_experiment
from spinemri.data.schema import HEAD_CLASSES
from spinemri.errors import EvaluationError
from spinemri.metrics.heads import METRICS
from spinemri.phantom import PhantomConfig, synthesize
from spinemri.tracking import lineage
from tests.conftest import copy_store

HEADS = tuple(HEAD_CLASSES)


# --- evaluate_run on a real run ----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, store_template):
    """One tiny training run on an 8-study phantom in a private store: (tracking URI, cache dir, data dir, run id)."""
    root = tmp_path_factory.mktemp("evaluate")
    data_dir = root / "data"
    synthesize(data_dir, PhantomConfig(studies=8, seed=3), workers=1)
    uri, cache_dir = copy_store(store_template, root / "mlflow.db"), root / "cache"
    from spinemri.api.classifier import train

    with pytest.MonkeyPatch.context() as patch:
        _private_store(patch, uri, cache_dir)
        result = train(load_experiment("quick", {"arch": "tiny", "data_dir": str(data_dir), "img_size": 48,
                                                 "epochs": 1}))
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # mlflow.set_experiment() exports it
        mlflow.set_tracking_uri(None)  # back to the environment's store for the tests that follow
    return uri, cache_dir, data_dir, result.run_id


@pytest.fixture
def store(trained, monkeypatch):
    uri, cache_dir, data_dir, run_id = trained
    _private_store(monkeypatch, uri, cache_dir)
    yield mlflow.MlflowClient(uri), data_dir, run_id
    while mlflow.active_run():
        mlflow.end_run()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    mlflow.set_tracking_uri(None)


def _private_store(patch: pytest.MonkeyPatch, uri: str, cache_dir: Path) -> None:
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.setenv("SPINEMRI_CACHE_DIR", str(cache_dir))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        patch.delenv(var, raising=False)
    mlflow.set_tracking_uri(uri)


def test_evaluate_run_logs_into_the_finished_run(store):
    client, _, run_id = store
    before = client.get_run(run_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate_run(run_id, n_boot=200)
    assert not [w for w in caught if "changed since training" in str(w.message)]
    after = client.get_run(run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", before.info.end_time)
    assert report["run_id"] == run_id and report["split"] == "test" and report["model_uri"].startswith("models:/")
    assert report["baseline_source"] == "train"
    assert report["n_samples"] == lineage.logged_profile(before, "test")["samples"]

    metrics = after.data.metrics
    for head in HEADS:
        for name in METRICS:
            key = f"test_{head}_{name}"
            if key in before.data.metrics:  # training leaves out NaN (e.g. an AUC with one class)
                values = {m.value for m in client.get_metric_history(run_id, key)}
                assert values == {before.data.metrics[key]}, key  # the same number, logged again
        assert f"test_{head}_ece" in metrics
        assert f"test_{head}_accuracy_majority" not in metrics  # baselines are rows of the table
    assert {m.value for m in client.get_metric_history(run_id, "test_severity_weighted_log_loss")} == \
        {before.data.metrics["test_severity_weighted_log_loss"]}
    assert not any(k.startswith("test_severity_accuracy_l") for k in metrics)  # per level: the table
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/evaluation/test_table.json")
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    accuracy = next(r for r in rows if (r["head"], r["scope"], r["metric"]) == ("severity", "head", "accuracy"))
    assert accuracy["prior"] == report["heads"]["severity"]["metrics"]["accuracy"]["prior"]
    assert accuracy["n_samples"] == report["heads"]["severity"]["n_samples"]
    assert {r["group"] for r in rows if r["scope"] == "level"} == {"L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"}

    paths = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert paths == {"evaluation/test.json", "evaluation/test.md", "evaluation/test_breakdown_severity.png",
                     *(f"evaluation/test_reliability_{h}.png" for h in HEADS),
                     "evaluation/test_predictions.csv",  # logged by training, for paired champion decisions
                     "evaluation/test_rsna_score.terms.csv",  # and its study score's per-study terms
                     "evaluation/test_floor_predictions.csv",  # and what its floor (the per-site prior) predicted
                     "evaluation/test_table.json", "evaluation/test_rsna_score_table.json",  # MLflow tables
                     "evaluation/test_operating_points.json"}  # training's referral points
    logged = mlflow.artifacts.load_dict(f"runs:/{run_id}/evaluation/test.json")
    assert logged == report
    assert "| accuracy |" in mlflow.artifacts.load_text(f"runs:/{run_id}/evaluation/test.md")

    val = evaluate_run(run_id, "val", n_boot=50)
    paths = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/test.json", "evaluation/val.json", "evaluation/val_reliability_severity.png"} <= paths
    metrics = client.get_run(run_id).data.metrics
    assert metrics["val_severity_accuracy"] == val["heads"]["severity"]["metrics"]["accuracy"]["value"]
    # a split of one study (8 studies x 10 %) gets no interval rather than a zero-width one
    assert ("val_severity_accuracy_ci_low" in metrics) == (val["heads"]["severity"]["n_studies"] >= 2)
    assert client.get_run(run_id).info.end_time == before.info.end_time


def test_evaluate_run_refuses_what_it_cannot_evaluate(store, tmp_path):
    client, data_dir, run_id = store
    with pytest.raises(EvaluationError, match="unknown split 'validation'; choose one of: train, val, test"):
        evaluate_run(run_id, "validation")
    with pytest.raises(EvaluationError, match="run '0123456789abcdef0123456789abcdef' not found in sqlite:///"):
        evaluate_run("0123456789abcdef0123456789abcdef")
    trial = client.create_run(client.get_run(run_id).info.experiment_id, run_name="trial-0")
    client.set_terminated(trial.info.run_id)
    with pytest.raises(EvaluationError, match=r"\(trial-0\) has no logged model, like a tuning trial"):
        evaluate_run(trial.info.run_id)
    with mlflow.start_run(run_id=trial.info.run_id):
        with pytest.raises(EvaluationError, match=f"another MLflow run \\({trial.info.run_id}\\) is active"):
            evaluate_run(run_id)

    moved = tmp_path / "moved"
    shutil.move(data_dir, moved)
    try:
        with pytest.raises(EvaluationError, match=f"data_dir {re.escape(str(data_dir))}.*does not exist"):
            evaluate_run(run_id)
    finally:
        shutil.move(moved, data_dir)

    labels = data_dir / "train.csv"
    original = labels.read_text()
    graded = pd.read_csv(labels)
    graded.loc[:, graded.columns != "study_id"] = np.nan  # every grade blank
    graded.to_csv(labels, index=False)
    try:
        with pytest.raises(EvaluationError, match="the test split of .* has no labelled samples"):
            evaluate_run(run_id)
    finally:
        labels.write_text(original)
    assert client.get_run(run_id).info.status == "FINISHED"

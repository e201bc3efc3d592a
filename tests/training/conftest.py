"""Fixtures for training tests: a 40-study phantom (the quick profile's data) and a private MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from spinemri.data.phantom import PhantomConfig, synthesize


@pytest.fixture(scope="session")
def phantom40(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom40") / "data"
    synthesize(out, PhantomConfig(studies=40, seed=0), workers=2)
    return out


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store and cache folder for one test; returns the tracking URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SPINEMRI_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # mlflow.set_experiment() exports it; keep tests apart

"""Shared fixtures: small phantom datasets built with the project's own generator."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

from spinemri.data.phantom import PhantomConfig, synthesize

# Eight studies with the real data's quirks made common: a second axial series, a missing series.
QUIRKY = PhantomConfig(studies=8, seed=3, p_second_axial=0.4, p_missing_series=0.25, p_blank=0.03)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A read-only-by-convention phantom dataset (copy it with `phantom_copy` before changing it)."""
    out = tmp_path_factory.mktemp("phantom") / "data"
    synthesize(out, QUIRKY, workers=1)
    return out


@pytest.fixture
def phantom_copy(phantom_dir, tmp_path) -> Path:
    """A private copy of the phantom that a test may damage."""
    target = tmp_path / "data"
    shutil.copytree(phantom_dir, target)
    return target


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@contextlib.contextmanager
def isolated_tracking(uri: str, cache_dir: Path):
    """Point MLflow and the cache at a session fixture's own store, then restore the environment."""
    import mlflow

    keys = ("MLFLOW_TRACKING_URI", "SPINEMRI_CACHE_DIR", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(MLFLOW_TRACKING_URI=uri, SPINEMRI_CACHE_DIR=str(cache_dir))
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

"""Shared fixtures: small phantom datasets built with the project's own generator, private MLflow stores,
and one small trained, registered model per test worker.

The phantom the model is trained on carries patient-identifying tags (the privacy canaries below) in
every DICOM file, so that tests can look for them in everything MLflow stored.
"""

from __future__ import annotations

import base64
import contextlib
from dataclasses import dataclass
import io
import os
from pathlib import Path
import shutil

import mlflow
import numpy as np
import pydicom
import pytest

from spinemri.config import load_experiment
from spinemri.data.dicom import encode_dicom
from spinemri.phantom import PhantomConfig, synthesize

# Eight studies with the real data's quirks made common: a second axial series, a missing series.
QUIRKY = PhantomConfig(studies=8, seed=3, p_second_axial=0.4, p_missing_series=0.25, p_blank=0.03)


@pytest.fixture(autouse=True)
def temporary_files_removed_after_each_test(tmp_path_factory, monkeypatch):
    """Every temporary file a test's code and its subprocesses make, removed when the test ends.

    MLflow downloads a model or an artifact that is given no destination into a new temporary
    folder and never removes it (a model is ~170 MB); over a suite that fills a disk. Fixtures of a
    wider scope are set up before this one, so what they keep for later tests stays where it is.
    """
    import tempfile

    folder = tmp_path_factory.mktemp("tmp", numbered=True)
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield
    shutil.rmtree(folder, ignore_errors=True)


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


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with its tables, made once per test worker: a new store spends seconds
    in schema migrations, a copy of this one none (tests/tracking/test_store.py creates stores for real)."""
    from spinemri.tracking.store import open_tracking_store

    path = tmp_path_factory.mktemp("store_template") / "mlflow.db"
    open_tracking_store(f"sqlite:///{path}", reap=False)
    return path


def copy_store(template: Path, path: Path) -> str:
    """A new store at ``path``, copied from :func:`store_template`; returns its tracking URI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


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


@pytest.fixture(scope="session")
def phantom40(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom40") / "data"
    synthesize(out, PhantomConfig(studies=40, seed=0), workers=2)
    return out


@pytest.fixture
def tracking(tmp_path, monkeypatch, store_template) -> str:
    """A fresh sqlite MLflow store and cache folder for one test; returns the tracking URI."""
    uri = copy_store(store_template, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SPINEMRI_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # mlflow.set_experiment() exports it; keep tests apart


# --- one trained, registered model -------------------------------------------------------------

CANARIES = {
    "PatientName": "Canary^Patricia",
    "PatientID": "CANARY-PID-7731",
    "PatientBirthDate": "19420317",
    "AccessionNumber": "CANARYACC4242",
    "InstitutionName": "Canary Valley Hospital",
    "ReferringPhysicianName": "Canary^Doctor",
    "OtherPatientIDs": "CANARY-OTHER-99",
}


@dataclass
class TrainedModel:
    tracking_uri: str
    data_dir: Path
    cache_dir: Path
    run_id: str
    model_uri: str


def no_pixels_dicom_b64() -> str:
    """A valid DICOM file (base64) whose data set has no pixel data element."""
    ds = pydicom.dcmread(io.BytesIO(encode_dicom(np.ones((8, 8)))))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return base64.b64encode(buffer.getvalue()).decode()


def add_patient_tags(folder: Path) -> int:
    count = 0
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword, value in CANARIES.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
        count += 1
    return count


@pytest.fixture(scope="session")
def trained(tmp_path_factory, store_template) -> TrainedModel:
    root = tmp_path_factory.mktemp("served")
    data_dir = root / "data"
    synthesize(data_dir, PhantomConfig(studies=10, seed=5), workers=1)
    assert add_patient_tags(data_dir / "train_images") > 100
    uri = copy_store(store_template, root / "mlflow.db")
    with isolated_tracking(uri, root / "cache"):
        from spinemri.api.classifier import train

        # 10 studies leave 1 held-out study, too few to show any model better than its floor: the served model
        # of these tests is allowed below it (tests/tracking/test_registry.py checks that the decision says so).
        config = load_experiment("quick", {"arch": "tiny", "data_dir": str(data_dir), "img_size": 48, "epochs": 1,
                                           "batch_size": 32, "model.calibration": "temperature",
                                           "mlflow.allow_below_floor": True})
        result = train(config)
    return TrainedModel(tracking_uri=uri, data_dir=data_dir, cache_dir=root / "cache", run_id=result.run_id,
                        model_uri=result.model_uri)


@pytest.fixture
def store(trained, monkeypatch) -> TrainedModel:
    """The trained model's store as this test's tracking URI."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.tracking_uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(trained.tracking_uri)
    return trained


# --- real servers: PostgreSQL and an MLflow tracking server on it (tests/services.py) ------------------


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL cluster on 127.0.0.1 for this test worker (about 2 s to start)."""
    from tests.services import postgres_server

    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def tracking_server(postgres, tmp_path_factory) -> str:
    """``mlflow server`` with a PostgreSQL backend and a local artifact destination; yields its http URL."""
    from tests.services import mlflow_server

    root = tmp_path_factory.mktemp("tracking_server")
    with mlflow_server(postgres.create_database("mlflow"), root / "artifacts", root / "server.log") as url:
        yield url

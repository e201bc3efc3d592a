"""One small trained, registered model per test worker, in its own sqlite MLflow store.

The phantom it is trained on carries patient-identifying tags (the privacy canaries below) in
every DICOM file, so that tests can look for them in everything MLflow stored.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pydicom
import pytest

from spinemri.config import load_experiment
from tests.conftest import isolated_tracking
from spinemri.data.dicom import encode_dicom
from spinemri.data.phantom import PhantomConfig, synthesize

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
def trained(tmp_path_factory) -> TrainedModel:
    root = tmp_path_factory.mktemp("served")
    data_dir = root / "data"
    synthesize(data_dir, PhantomConfig(studies=10, seed=5), workers=1)
    assert add_patient_tags(data_dir / "train_images") > 100
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with isolated_tracking(uri, root / "cache"):
        from spinemri.training.train import train

        config = load_experiment("quick", {"arch": "tiny", "data_dir": str(data_dir), "img_size": 48, "epochs": 1,
                                           "batch_size": 32})
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

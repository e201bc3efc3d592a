"""Reading what runs logged without leaving downloads behind.

MLflow downloads an artifact or a model into a fresh temporary folder when it is given no
destination, and never removes it: a model is a few hundred MB, so a process (or a test suite)
that loads many would fill the disk. Every read of a logged file or model goes through here,
into a folder that is removed as soon as the read is done.
"""

from __future__ import annotations

import io
from pathlib import Path
import tempfile
from urllib.parse import urlparse

import mlflow
import pandas as pd


def logged_csv(run_id: str, artifact: str, **read_csv) -> pd.DataFrame:
    """A CSV file a run logged, read into a table; MLflow's errors (no such run or file) pass through."""
    return pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact}")), **read_csv)


def load_pyfunc(model_uri: str):
    """``mlflow.pyfunc.load_model`` with its download removed once loaded.

    spinemri's python models read every file they need while loading (weights, metadata), so
    nothing refers to the folder afterwards. A model on this machine's disk (a folder, or a run
    or registry store kept in local files) is read where it is: MLflow copies nothing then.
    """
    if _on_local_disk(model_uri):
        return mlflow.pyfunc.load_model(model_uri)
    with tempfile.TemporaryDirectory(prefix="spinemri-model-") as folder:
        return mlflow.pyfunc.load_model(model_uri, dst_path=folder)


def _on_local_disk(model_uri: str) -> bool:
    """Whether the files behind ``model_uri`` are local files; False where that cannot be told (a
    download into a removed folder is then the safe side)."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    if Path(model_uri).exists():
        return True
    try:
        if model_uri.startswith("models:/"):
            model_uri = ModelsArtifactRepository.get_underlying_uri(model_uri)
        elif model_uri.startswith("runs:/"):
            model_uri = RunsArtifactRepository.get_underlying_uri(model_uri)
    except Exception:  # noqa: BLE001 - no such model or an unreachable store: load_model names it
        return False
    return urlparse(model_uri).scheme in ("", "file")

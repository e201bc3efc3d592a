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

import mlflow
import pandas as pd


def logged_csv(run_id: str, artifact: str, **read_csv) -> pd.DataFrame:
    """A CSV file a run logged, read into a table; MLflow's errors (no such run or file) pass through."""
    return pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact}")), **read_csv)


def load_pyfunc(model_uri: str):
    """``mlflow.pyfunc.load_model`` with its download removed once loaded.

    spinemri's python models read every file they need while loading (weights, metadata), so
    nothing refers to the folder afterwards. A local folder is loaded where it is.
    """
    if Path(model_uri).exists():
        return mlflow.pyfunc.load_model(model_uri)
    with tempfile.TemporaryDirectory(prefix="spinemri-model-") as folder:
        return mlflow.pyfunc.load_model(model_uri, dst_path=folder)

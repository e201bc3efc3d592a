"""The MLproject entry points run under `mlflow run . --env-manager local` and record their runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
from tests.conftest import copy_store

ROOT = Path(__file__).resolve().parents[1]


def _mlflow_run(entry_point: str, params: dict, tracking_uri: str, env_extra: dict) -> subprocess.CompletedProcess:
    # mlflow.set_experiment() in an earlier test of this worker exports MLFLOW_EXPERIMENT_ID, which
    # `mlflow run --experiment-name` refuses to combine with: start from a clean environment.
    inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env = {**inherited, **env_extra, "MLFLOW_TRACKING_URI": tracking_uri,
           # `python` in the entry point's command must be this interpreter (what an activated venv gives)
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "-e", entry_point,
               "--experiment-name", "data"]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_synth_and_prepare_entry_points(tmp_path, store_template):
    tracking_uri = copy_store(store_template, tmp_path / "mlflow.db")
    env = {"SPINEMRI_CACHE_DIR": str(tmp_path / "cache")}
    synth = _mlflow_run("synth", {"out": tmp_path / "phantom", "studies": 3, "seed": 2}, tracking_uri, env)
    assert synth.returncode == 0, synth.stderr[-2000:]
    assert (tmp_path / "phantom" / "train.csv").is_file()
    prepare = _mlflow_run("prepare", {"data_dir": tmp_path / "phantom", "img_size": 32, "workers": 1}, tracking_uri, env)
    assert prepare.returncode == 0, prepare.stderr[-2000:]
    assert "samples per split: train" in prepare.stdout
    assert any((tmp_path / "cache").glob("*/manifest.json"))

    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("data").experiment_id])
    assert sorted(r.data.tags["mlflow.project.entryPoint"] for r in runs) == ["prepare", "synth"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_failing_entry_point_fails_the_run(tmp_path, store_template):
    tracking_uri = copy_store(store_template, tmp_path / "mlflow.db")
    (tmp_path / "empty").mkdir()
    result = _mlflow_run("prepare", {"data_dir": tmp_path / "empty"}, tracking_uri, {})
    assert result.returncode != 0
    assert "no train.csv" in result.stderr + result.stdout
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("data").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]

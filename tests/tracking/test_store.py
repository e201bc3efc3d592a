"""Opening the MLflow store: processes that start together on a new sqlite store, bad locations."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest
from click.testing import CliRunner

from spinemri.cli import main as cli
from spinemri.errors import UserError
from spinemri.tracking.store import LOCK_SUFFIX, open_tracking_store, sqlite_path


def test_commands_started_together_on_a_new_store_all_open_it(tmp_path):
    # Without the lock, MLflow's first-use migration of a new sqlite file fails in most of the
    # processes that start together ("table experiments already exists" and the like).
    database = tmp_path / "mlflow.db"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "MLFLOW_TRACKING_URI": f"sqlite:///{database}"}
    command = [sys.executable, "-m", "spinemri", "registry", "list", "--name", "nothing-yet"]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert "Traceback" not in err, err[-3000:]
        assert process.returncode == 1 and "no registered model 'nothing-yet'" in err, (out, err[-2000:])
    assert (tmp_path / f"mlflow.db{LOCK_SUFFIX}").exists()
    names = [e.name for e in mlflow.MlflowClient(f"sqlite:///{database}").search_experiments()]
    assert names == ["Default"]


def test_opening_creates_the_tables_once_and_again_is_harmless(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert open_tracking_store(uri) == uri
    experiment = mlflow.MlflowClient(uri).create_experiment("kept")
    open_tracking_store(uri)
    assert mlflow.MlflowClient(uri).get_experiment(experiment).name == "kept"


@pytest.mark.parametrize("uri, path", [
    ("sqlite:////abs/dir/mlflow.db", "/abs/dir/mlflow.db"),
    ("sqlite:///rel/mlflow.db?timeout=30", "rel/mlflow.db"),
    ("sqlite:///:memory:", None),
    ("http://localhost:5000", None),
    ("postgresql://u@host/db", None),
])
def test_only_sqlite_files_are_locked(uri, path):
    found = sqlite_path(uri)
    assert (None if found is None else str(found)) == path


def test_a_store_in_a_missing_folder_is_named_with_the_fix(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'no' / 'such' / 'mlflow.db'}"
    with pytest.raises(UserError, match=r"its folder .*no/such does not exist; create it \(mkdir -p "):
        open_tracking_store(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        result = CliRunner().invoke(cli, ["registry", "list"])
    finally:
        mlflow.set_tracking_uri(None)
    assert result.exit_code == 1 and "no/such does not exist" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "no").exists()


def test_a_tracking_server_that_does_not_answer_is_named_within_seconds(tmp_path):
    """MLflow's client retries a refused connection for minutes; a command says where it could not connect first
    (the subprocess timeout bounds what this test waits)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = "http://reader:s3cret@127.0.0.1:1"
    for command in (["registry", "list"], ["predict", "--input", str(tmp_path), "--out", str(tmp_path / "p.csv")]):
        done = subprocess.run([sys.executable, "-m", "spinemri", *command], capture_output=True, text=True, env=env,
                              timeout=60, cwd=tmp_path)
        assert done.returncode == 1, done.stderr[-2000:]
        assert "cannot reach the MLflow tracking server at http://reader:***@127.0.0.1:1" in done.stderr
        assert "s3cret" not in done.stdout + done.stderr and "Traceback" not in done.stderr


def test_a_tracking_server_that_accepts_but_never_answers_is_named_within_its_timeout():
    import socket
    import time

    from spinemri.tracking.store import REACH_TIMEOUT_S, check_server

    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://user:secret@127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(UserError) as caught:
            check_server(uri)
    assert time.monotonic() - started < REACH_TIMEOUT_S + 2
    assert "secret" not in str(caught.value) and "127.0.0.1" in str(caught.value)

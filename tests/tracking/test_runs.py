"""A run's life: interrupts never land inside tracking code, the end is always recorded, and the runs of
processes that died without ending them (SIGKILL, the OOM killer) are marked FAILED by the next command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import types

import mlflow
import pytest
from click.testing import CliRunner

from spinemri.cli import main as cli
from spinemri.processes import HOST, process_gone, process_id
from spinemri.tracking.runs import PROCESS_TAG, RESUMED_FROM_TAG, ending_run, reap_dead_runs, start_run
from spinemri.tracking.store import open_tracking_store
from tests.conftest import copy_store


@pytest.fixture
def store(tmp_path, monkeypatch, store_template) -> str:
    uri = copy_store(store_template, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(uri)
    open_tracking_store(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def _tracking_module() -> types.ModuleType:
    """Stands in for MLflow's store code: a module under the mlflow package name that writes slowly."""
    module = types.ModuleType("mlflow.store_write_in_progress")
    exec("import time\n"
         "def write(seconds, log):\n"
         "    end = time.monotonic() + seconds\n"
         "    while time.monotonic() < end:\n"
         "        pass\n"
         "    log.append('written')\n", module.__dict__)
    return module


def _status(run_id: str) -> str:
    return mlflow.MlflowClient().get_run(run_id).info.status


def test_an_interrupt_waits_until_tracking_code_returns(store):
    mlflow.set_experiment("interrupts")
    run = start_run(run_name="interrupted")
    writer, log = _tracking_module(), []
    before = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN in a process started in the background
    with pytest.raises(KeyboardInterrupt):
        with ending_run():
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
            writer.write(0.6, log)  # the signal arrives in here ...
            log.append("returned")  # ... and is raised only after the write returned
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.01)
            log.append("not interrupted")
    assert log == ["written", "returned"]
    assert _status(run.info.run_id) == "KILLED"
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back


def test_a_second_interrupt_while_the_run_ends_cannot_leave_it_running(store, monkeypatch):
    mlflow.set_experiment("interrupts")
    run = start_run(run_name="twice")
    real_end_run = mlflow.end_run

    def slow_end_run(status):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C pressed again while the end is being recorded
        time.sleep(0.2)
        real_end_run(status)

    monkeypatch.setattr(mlflow, "end_run", slow_end_run)
    with pytest.raises(KeyboardInterrupt):
        with ending_run():
            raise KeyboardInterrupt("first Ctrl-C")
    assert _status(run.info.run_id) == "KILLED"


def _dead_run(store: str, experiment: str, resumed_from: str | None = None) -> str:
    """A real process that starts a run as spinemri does and is then killed with SIGKILL; returns the run id."""
    code = ("import os, signal, sys, mlflow\n"
            "from spinemri.tracking.runs import start_run\n"
            f"mlflow.set_experiment({experiment!r})\n"
            "run = start_run(run_name='doomed')\n"
            "print(run.info.run_id, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_TRACKING_URI": store})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    run_id = done.stdout.split()[0]
    if resumed_from:
        mlflow.MlflowClient().set_tag(run_id, RESUMED_FROM_TAG, resumed_from)
    assert _status(run_id) == "RUNNING"
    return run_id


def test_the_runs_of_a_killed_process_are_marked_failed_by_the_next_command(store):
    ghost = _dead_run(store, "ghosts")
    reevaluated = _dead_run(store, "ghosts", resumed_from="FINISHED")  # killed inside `spinemri evaluate`
    mlflow.set_experiment("ghosts")
    alive = start_run(run_name="this process, still running")
    result = CliRunner().invoke(cli, ["runs", "reap", "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(eval(result.output)["reaped"]) == sorted([ghost, reevaluated])
    ghost_run = mlflow.MlflowClient().get_run(ghost)
    assert ghost_run.info.status == "FAILED" and "died without ending the run" in ghost_run.data.tags["fail_reason"]
    assert _status(reevaluated) == "FINISHED"  # back to what it was before it was reopened
    assert _status(alive.info.run_id) == "RUNNING"
    mlflow.end_run()

    another = _dead_run(store, "ghosts")
    open_tracking_store(store)  # what every command that uses the store does first
    assert _status(another) == "FAILED"
    assert reap_dead_runs() == []


def test_a_process_is_gone_only_when_it_is_this_hosts_and_has_ended():
    assert not process_gone(process_id())
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert process_gone(f"{HOST}:{ended.pid}:1")
    assert not process_gone(f"another-host:{ended.pid}:1")  # cannot be checked from here
    pid, started = process_id().split(":")[1:]
    assert process_gone(f"{HOST}:{pid}:{int(started) - 1}")  # the same pid, but another process's start time
    assert not process_gone("")


def test_runs_carry_the_process_that_owns_them(store):
    mlflow.set_experiment("owners")
    with start_run(run_name="mine") as run:
        pass
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.tags[PROCESS_TAG] == process_id()

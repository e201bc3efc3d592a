"""Tuning as several machines do it: two `spinemri tune` commands with caches of their own work on one
study in a real PostgreSQL and log to one real `mlflow server`; one of them is killed mid-trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import mlflow
import optuna
from optuna.trial import TrialState
import pytest

from spinemri.api.tune import study_lock
from spinemri.errors import TuningError

TRIALS = 3


def _command(phantom_dir, storage: str) -> list[str]:
    return [sys.executable, "-m", "spinemri", "tune", "--arch", "tiny", "--trials", str(TRIALS), "--data-dir",
            str(phantom_dir), "--epochs", "2", "--storage", storage, "--set", "preprocess.img_size=32",
            "--set", "mlflow.experiment=team-tune", "--set", "tuning.pruner=none",
            "--set", "train.early_stopping_patience=100",
            "--set", "tuning.heartbeat_interval=1", "--set", "tuning.grace_period=10"]


def _machine_env(tracking_server: str, cache) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "MLFLOW_TRACKING_URI": tracking_server, "SPINEMRI_CACHE_DIR": str(cache)}


def _trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="quick-tiny", storage=storage).trials


def test_two_machines_end_with_exactly_n_trials_when_one_is_killed(postgres, tracking_server, phantom_dir, tmp_path):
    storage = postgres.create_database("optuna")
    command = _command(phantom_dir, storage)
    victim = subprocess.Popen(command, env=_machine_env(tracking_server, tmp_path / "machine-a"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    survivor = subprocess.Popen(command, env=_machine_env(tracking_server, tmp_path / "machine-b"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 400
    killed_number = None
    while killed_number is None:  # the victim's trial is under way and has reported an epoch
        assert time.monotonic() < deadline, "the first machine never ran a trial"
        assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
        time.sleep(0.5)
        try:
            trials = _trials(storage)
        except KeyError:  # no study yet
            continue
        for trial in trials:
            owner = str(trial.user_attrs.get("process", ""))
            if trial.state == TrialState.RUNNING and f":{victim.pid}:" in owner and trial.intermediate_values:
                killed_number = trial.number
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()

    _, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err.decode()[-3000:]
    trials = _trials(storage)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == TRIALS
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    assert killed_number in failed  # (on an overloaded machine a live worker's late heartbeats can fail one more)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    killed = trials[killed_number]
    retry = [t for t in finished if killed_number in t.system_attrs.get("retry_history", [])]
    assert len(retry) == 1 and retry[0].params == killed.params, "the killed trial is run again, same parameters"
    assert f":{survivor.pid}:" in retry[0].user_attrs["process"]

    client = mlflow.MlflowClient(tracking_uri=tracking_server)
    experiment = client.get_experiment_by_name("team-tune")
    runs = client.search_runs([experiment.experiment_id])
    by_trial = {r.data.tags["optuna.trial"]: r for r in runs if r.data.tags.get("role") == "trial"}
    seen = [(r.data.tags.get("role"), r.data.tags.get("optuna.trial"), r.info.status, r.data.tags.get("fail_reason"))
            for r in runs]
    assert {str(t.number) for t in trials} <= set(by_trial), (seen, err.decode()[-3000:])
    assert by_trial[str(killed_number)].info.status == "FAILED"
    assert "stopped sending heartbeats" in by_trial[str(killed_number)].data.tags["fail_reason"]
    assert by_trial[str(retry[0].number)].data.tags["optuna.retry_of"] == str(killed_number)
    for number in failed:
        assert "heartbeats" in by_trial[str(number)].data.tags["fail_reason"]
    assert by_trial[str(retry[0].number)].info.status == "FINISHED"
    parent = next(r for r in runs if r.data.tags.get("role") == "study" and r.info.status == "FINISHED")
    assert parent.data.metrics["trials_complete"] + parent.data.metrics["trials_pruned"] == TRIALS
    final = client.get_run(parent.data.tags["final_run_id"])
    assert final.info.status == "FINISHED"
    versions = client.search_model_versions(f"run_id = '{final.info.run_id}'")
    assert len(versions) == 1, "the survivor's final model is registered on the tracking server"


def test_the_study_lock_is_one_holder_across_connections(postgres):
    """The PostgreSQL advisory lock excludes a second holder, and a holder's lock is the study's only."""
    storage = postgres.create_database("locks")
    inside, order = threading.Event(), []

    def second() -> None:
        inside.wait()
        with study_lock(storage, "study-a"):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    with study_lock(storage, "study-a"):
        inside.set()
        with study_lock(storage, "study-b"):  # another study's lock is free
            order.append("other study")
        time.sleep(1.0)
        order.append("first")
    thread.join(timeout=30)
    assert order == ["other study", "first", "second"]


def test_an_unsupported_database_is_refused_by_name(tmp_path):
    with pytest.raises(TuningError, match="postgresql, mysql or sqlite"):
        with study_lock("oracle://user@host/db", "study"):
            pass

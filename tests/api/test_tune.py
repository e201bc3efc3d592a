"""Optuna studies: nested runs and pruning, a failing trial, kill-and-resume, parallel processes, bad input."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from click.testing import CliRunner
import mlflow
import optuna
from optuna.trial import TrialState
import pytest

from spinemri.api.tune import open_storage, tune
from spinemri.cli import main as cli
from spinemri.config import load_experiment, param_name
from spinemri.errors import ConfigError

SMALL_SPACE = {
    "train.lr": {"type": "float", "low": 3e-4, "high": 3e-3, "log": True},
    "model.dropout": {"type": "float", "low": 0.1, "high": 0.5},
    "train.batch_size": {"type": "categorical", "choices": [16, 32]},
}


def _config(phantom_dir, tmp_path, trials, **extra):
    overrides = {"arch": "tiny", "data_dir": str(phantom_dir), "img_size": 32, "epochs": 3, "trials": trials,
                 "storage": str(tmp_path / "journal.log"), "tuning.search_space": SMALL_SPACE,
                 "mlflow.experiment": "tune",
                 # the 8-study phantom leaves 1 test study: too few to show a model better than its floor
                 "mlflow.allow_below_floor": True, **extra}
    return load_experiment("quick", overrides)


def _study(tmp_path, name="quick-tiny"):
    return optuna.load_study(study_name=name, storage=open_storage(str(tmp_path / "journal.log")))


def _runs(tracking_uri):
    client = mlflow.MlflowClient(tracking_uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_study_with_nested_trials_pruning_and_a_final_model(phantom_dir, tmp_path, tracking, capsys):
    # An aggressive median pruner: from the second trial on, worse than the median at any epoch = pruned.
    config = _config(phantom_dir, tmp_path, 6, **{"tuning.pruner": "median", "tuning.n_startup_trials": 1,
                                                   "tuning.n_warmup_steps": 0})
    result = tune(config)
    study = _study(tmp_path)
    states = [t.state for t in study.trials]
    # one line per trial: its number and its value, or that it was pruned
    printed = capsys.readouterr().out.splitlines()
    for trial in study.trials:
        line = [s for s in printed if s.startswith(f"trial {trial.number}: ")]
        assert len(line) == 1, printed
        assert ("pruned" in line[0]) == (trial.state == TrialState.PRUNED), line
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 6
    assert TrialState.PRUNED in states, "the aggressive median pruner should prune at least one trial"
    assert result.counts["complete"] + result.counts["pruned"] == 6

    runs = _runs(tracking)
    parent = next(r for r in runs if r.data.tags.get("role") == "study")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = [r for r in children if r.data.tags.get("role") == "trial"]
    assert len(trials) == 6
    assert {r.data.tags["optuna.state"] for r in trials} >= {"COMPLETE", "PRUNED"}
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trials) == list(range(6))
    for run in trials:
        assert run.info.status == "FINISHED"
        # a pruned trial says so where the runs table shows it, its name
        pruned = run.data.tags["optuna.state"] == "PRUNED"
        assert run.info.run_name == f"trial-{run.data.tags['optuna.trial']}" + ("-pruned" if pruned else "")
        assert run.data.tags.get("mlflow.note.content", "").startswith("Pruned by Optuna") == pruned
        sampled = study.trials[int(run.data.tags["optuna.trial"])].params
        # The sampled values are the trial's settings, logged once under the setting's param name.
        assert {param_name(k): str(v) for k, v in sampled.items()}.items() <= run.data.params.items()
        assert not [k for k in run.data.params if k.startswith("trial.")] and "val_loss" in run.data.metrics
        assert not any(k.startswith("test_") for k in run.data.metrics)  # trials never look at the test split
        # every trial keeps the epochs it ran, a pruned one too (it stops inside an epoch's end)
        history = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/training/history.json")
        assert history["data"] and "val_loss" in history["columns"], run.data.tags["optuna.state"]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert {f"best.{k}" for k in SMALL_SPACE} <= set(parent.data.params)
    assert parent.data.metrics["trials_pruned"] >= 1
    assert len([k for k in parent.data.metrics if not k.startswith("system/")]) <= 150
    artifacts = {a.path for a in mlflow.MlflowClient(tracking).list_artifacts(parent.info.run_id, "study")}
    assert {"study/optimization_history.png", "study/parallel_coordinate.png", "study/trials.csv"} <= artifacts

    final = next(r for r in children if r.info.run_id == parent.data.tags["final_run_id"])
    assert final.info.status == "FINISHED" and "test_severity_roc_auc" in final.data.metrics
    for key, value in study.best_params.items():
        assert final.data.params[param_name(key)] == str(value)
    # Only the retrained best configuration is registered, never a trial.
    versions = mlflow.MlflowClient().search_model_versions("name = 'spinemri'")
    assert [v.run_id for v in versions] == [final.info.run_id]
    assert final.data.tags["alias_when_registered"] == "champion"


def test_a_failing_trial_is_recorded_and_the_study_goes_on(phantom_dir, tmp_path, tracking):
    config = _config(phantom_dir, tmp_path, 2)
    study = optuna.create_study(study_name="quick-tiny", storage=open_storage(str(tmp_path / "journal.log")))
    # A queued trial outside the space (dropout 1.5) makes a bad combination: this trial must fail.
    study.enqueue_trial({"train.lr": 1e-3, "model.dropout": 1.5, "train.batch_size": 16},
                        skip_if_exists=False)
    result = tune(config)
    study = _study(tmp_path)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "model.dropout must be within" in failed[0].user_attrs["fail_reason"]
    assert result.counts["complete"] + result.counts["pruned"] == 2
    failed_runs = [r for r in _runs(tracking) if r.data.tags.get("optuna.state") == "FAIL"]
    assert len(failed_runs) == 1 and failed_runs[0].info.status == "FAILED"
    assert "model.dropout" in failed_runs[0].data.tags["fail_reason"]


def _tune_command(phantom_dir, tmp_path, trials, epochs):
    return [sys.executable, "-m", "spinemri", "tune", "--arch", "tiny", "--trials", str(trials), "--data-dir",
            str(phantom_dir), "--epochs", str(epochs), "--storage", str(tmp_path / "journal.log"),
            "--set", "preprocess.img_size=32", "--set", "mlflow.experiment=tune", "--set", "tuning.pruner=none",
            "--set", "train.early_stopping_patience=100"]


def _env(tracking):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    return {**env, "MLFLOW_TRACKING_URI": tracking}


# Slow set: a worker killed mid-trial with the study still ending at exactly N finished trials is
# tests/api/test_tune_postgres.py's (heartbeats); this is the journal's own recovery on resume.
@pytest.mark.slow
def test_kill_and_resume_finishes_exactly_n_trials(phantom_dir, tmp_path, tracking):
    command = _tune_command(phantom_dir, tmp_path, 2, 8)
    process = subprocess.Popen(command, env=_env(tracking), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = tmp_path / "journal.log"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until the second trial is under way
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        if journal.exists():
            trials = _study(tmp_path).trials
            if any(t.number == 1 and t.state == TrialState.RUNNING and t.intermediate_values for t in trials):
                break
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert any(r.info.status == "RUNNING" for r in _runs(tracking))  # what a crash leaves behind

    resumed = subprocess.run(command, env=_env(tracking), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = _study(tmp_path)
    states = [t.state for t in study.trials]
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 2
    assert states.count(TrialState.FAIL) == 1 and TrialState.RUNNING not in states
    killed = next(t for t in study.trials if t.state == TrialState.FAIL)
    assert killed.number == 1 and "died" in killed.user_attrs["fail_reason"]
    runs = _runs(tracking)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    by_trial = {r.data.tags.get("optuna.trial"): r for r in runs if r.data.tags.get("role") == "trial"}
    assert by_trial["1"].info.status == "FAILED"
    killed_study = [r for r in runs if r.data.tags.get("role") == "study" and r.info.status != "FINISHED"]
    assert len(killed_study) == 1 and killed_study[0].info.status == "FAILED"
    assert "died without ending the run" in killed_study[0].data.tags["fail_reason"]


# Two processes on one study: --workers 2 starts them; two separate commands (the slow set) do the same
# through the storage alone, and commands opening one store together are tests/tracking/test_store.py's.
@pytest.mark.parametrize("how", [pytest.param("two commands", marks=pytest.mark.slow), "--workers 2"])
def test_two_processes_share_one_study_and_stop_at_n(phantom_dir, tmp_path, tracking, how):
    command = _tune_command(phantom_dir, tmp_path, 4, 3)
    # Both processes open one store at once (creating a new one at once: tracking/test_store.py).
    copies = 2 if how == "two commands" else 1
    if how == "--workers 2":
        command += ["--workers", "2"]
    processes = [subprocess.Popen(command, env=_env(tracking), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(copies)]
    said = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.decode()[-3000:]
        said += (out + err).decode().splitlines()
    study = _study(tmp_path)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len(study.trials) == 4
    # a line per trial, and no warning from Optuna, matplotlib or MLflow (the study's plots included)
    assert sorted(int(line.split()[1].rstrip(":")) for line in said if re.match(r"trial \d+: ", line)) == [0, 1, 2, 3], said
    assert not [line for line in said if re.search(r"Warning|WARNING|cuInit|CUDA", line)], said
    assert len({t.user_attrs["process"] for t in study.trials}) == 2, "both processes should have run trials"


@pytest.mark.parametrize("space, message", [
    ({"train.lr": {"type": "gaussian", "low": 1, "high": 2}}, "tuning.search_space.train.lr.type must be one of"),
    ({"train.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "low (0.1) is greater than high (0.01)"),
    ({"train.batch_size": {"type": "categorical", "choices": []}}, "choices must be a non-empty list"),
    ({"train.colour": {"type": "float", "low": 0, "high": 1}}, "train.colour is not a config key"),
    ({"train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "log scale needs low > 0"),
])
def test_malformed_search_space_is_refused_before_training(space, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_experiment("quick", {"tuning.search_space": space, "trials": 2})


def test_bad_trials_and_storage_fail_with_one_line(tmp_path, tracking):
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--arch", "tiny", "--trials", "-1"])
    assert result.exit_code == 1 and "trials must be an integer >= 0" in result.output
    result = runner.invoke(cli, ["tune", "--arch", "tiny", "--trials", "0"])
    assert result.exit_code != 0 and "--trials" in result.output
    for url in ("postgresql://nobody@127.0.0.1:1/optuna", f"sqlite:///{tmp_path}/no/such/dir/optuna.db"):
        started = time.monotonic()
        result = runner.invoke(cli, ["tune", "--arch", "tiny", "--trials", "2", "--storage", url])
        assert result.exit_code == 1, result.output
        assert f"storage {url} is unreachable or invalid" in result.output and "Traceback" not in result.output
        assert time.monotonic() - started < 60
    assert _runs(tracking) == []  # nothing was started


def test_hyperband_is_the_default_pruner_and_spans_the_epochs(phantom_dir, tmp_path):
    """bench/tune.py measured hyperband saving 48 % of the epochs with the best value kept, where the
    median pruner lost the best trial; it is the default, its resource being the epoch."""
    from spinemri.api.tune import _load_study

    study = _load_study(_config(phantom_dir, tmp_path, 2, epochs=12), str(tmp_path / "journal.log"))
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    assert (study.pruner._min_resource, study.pruner._max_resource) == (1, 12)
    median = _load_study(_config(phantom_dir, tmp_path, 2, **{"tuning.pruner": "median", "study_name": "m"}),
                         str(tmp_path / "journal.log"))
    assert isinstance(median.pruner, optuna.pruners.MedianPruner)

"""Optuna studies: the experiment's search space, pruning, nested MLflow runs, resume and workers.

``tune(config)`` opens (or resumes) the study ``<experiment>-<arch>``, runs trials until
``tuning.trials`` have finished (COMPLETE or PRUNED) — each trial one nested MLflow run calling the
same :func:`spinemri.api.classifier.train` as the train command, watched by Optuna's
``KerasPruningCallback`` on the same monitor as early stopping — then logs the study to the parent
run and trains the best configuration as a normal run with its model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
import functools
import hashlib
import math
import multiprocessing
import os
from pathlib import Path
import sys
import threading
import time
from typing import Any, Mapping
from urllib.parse import urlparse
import warnings

import mlflow
import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from spinemri.api.classifier import train
from spinemri.api.source import prepare_data
from spinemri.config import ExperimentConfig, TuningConfig, run_params, with_values
from spinemri.errors import ConfigError, TuningError
from spinemri.metrics.goals import best_value, metric_goal
from spinemri.models.catalog import get_spec
from spinemri.processes import die_with_parent, process_gone, process_id
from spinemri.quiet import quietly
from spinemri.redact import redact
from spinemri.tracking.runs import ending_run, start_run, use_experiment
from spinemri.tracking.store import LOCK_SUFFIX, exclusive_lock, sqlite_path

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_RETRIES = 3  # a trial whose workers die this many times is left FAIL
LATE_HEARTBEATS = ("another worker failed this trial, its heartbeats later than tuning.grace_period, and queued it "
                   "again; raise tuning.grace_period on a busy or slow machine")


@dataclass
class TuneResult:
    study_name: str
    parent_run_id: str
    best_value: float
    best_params: dict[str, Any]
    counts: dict[str, int]
    final: Any  # the TrainResult of the best configuration
    monitor: str = ""  # what the trials were judged on (train.monitor)


def suggest(trial: optuna.Trial, space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The only place that calls ``trial.suggest_*``: one value per search-space key."""
    values = {}
    for key, spec in space.items():
        kind = spec["type"]
        if kind == "categorical":
            values[key] = trial.suggest_categorical(key, list(spec["choices"]))
        elif kind == "int":
            values[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                            log=bool(spec.get("log", False)))
        else:
            values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                                              log=bool(spec.get("log", False)))
    return values


def study_name(config: ExperimentConfig) -> str:
    return config.tuning.study_name or f"{config.name}-{config.model.arch}"


def default_storage() -> str:
    """A journal file next to the MLflow store (safe for several processes on one machine)."""
    tracking = mlflow.get_tracking_uri()
    parsed = urlparse(tracking)
    if parsed.scheme == "sqlite" and tracking.startswith("sqlite:///"):
        folder = Path(tracking[len("sqlite:///"):]).parent
    elif parsed.scheme in ("", "file"):
        folder = Path(parsed.path or ".").parent
    else:
        folder = Path.cwd()
    return str(folder.resolve() / "optuna-journal.log")


def open_storage(url: str, tuning: TuningConfig | None = None):
    """Optuna storage for a journal file path or an RDB URL; an unreachable one fails here.

    A database storage records a heartbeat of every running trial (``tuning.heartbeat_interval``); a
    trial silent for ``tuning.grace_period`` seconds is failed by the next worker that looks, and
    queued again with the same parameters (:func:`_retry_stale_trial`).
    """
    tuning = tuning or TuningConfig()
    if "://" in url:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                                  heartbeat_interval=tuning.heartbeat_interval,
                                                  grace_period=tuning.grace_period,
                                                  heartbeat_stale_trial_callback=_retry_stale_trial)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors of every kind
            raise TuningError(redact(f"storage {url} is unreachable or invalid ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:200]}); check the URL, or leave --storage empty "
                                     "for a local journal file")) from None
    path = Path(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as exc:
        raise TuningError(f"storage {url} cannot be written ({exc}); choose another --storage") from None


def tune(config: ExperimentConfig) -> TuneResult:
    """Run or resume the study, then train and log the best configuration (see the module docstring)."""
    config.validate()
    tuning = config.tuning
    if tuning.trials < 1:
        raise ConfigError("trials must be >= 1 to tune (trials=0 trains once)")
    if config.split.folds:
        raise ConfigError(f"split.folds={config.split.folds}: tuning with cross-validation is not available (each "
                          "trial is chosen on one validation split); set split.folds=0 (--folds 0) to tune")
    if not tuning.search_space:
        raise ConfigError(f"tuning.search_space is empty in experiment {config.name!r}; add keys such as "
                          "train.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}")
    get_spec(config.model.arch).check_size(config.preprocess.img_size)
    storage_url = tuning.storage or default_storage()
    study = _load_study(config, storage_url)
    prepare_data(config)  # the phantom and the cache exist before any trial starts
    _recover_dead(study)

    name = study.study_name
    if not os.environ.get("MLFLOW_RUN_ID"):
        use_experiment(config.mlflow.experiment)
    parent = start_run(run_name=f"{name}-study", system_metrics_interval=config.mlflow.system_metrics_interval,
                       tags={"optuna.study": name, "optuna.storage": redact(storage_url), "role": "study",
                             "arch": config.model.arch})
    with ending_run():
        # The study's own settings; each trial and the final run log the full set.
        mlflow.log_params({key: value for key, value in run_params(config, "tuning").items()
                           if key.startswith("tuning.") or key in ("arch", "experiment", "data_dir", "trials", "storage",
                                                                   "study_name", "pruner", "workers", "train.monitor")})
        mlflow.log_dict(config.to_dict(redacted=True), "config.yaml")
        experiment_id = parent.info.experiment_id
        helpers = []
        context = multiprocessing.get_context("spawn")
        for index in range(1, tuning.workers):
            # The helper imports this module (and TensorFlow) only once quiet: no CUDA lines without a GPU.
            process = context.Process(target=quietly, args=(f"{__name__}:_worker_main", config, storage_url,
                                                            parent.info.run_id, experiment_id, index, os.getpid()))
            process.start()
            helpers.append(process)
        try:
            work(config, study, parent.info.run_id, storage_url, worker_index=0)
        finally:
            for process in helpers:
                process.join()
        bad = [p.exitcode for p in helpers if p.exitcode not in (0, None)]
        if bad:
            raise TuningError(f"{len(bad)} worker process(es) failed (exit codes {bad}); see their output above")

        study = _load_study(config, storage_url)
        counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
                  for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        mlflow.log_metrics({f"trials_{k}": v for k, v in counts.items()})
        if counts["complete"] == 0:
            raise TuningError(f"no trial of study {name} completed ({counts}); see the failed trials' fail_reason tags")
        best = study.best_trial
        mlflow.log_metric("best_value", best.value)
        mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
        mlflow.set_tag("best_trial", str(best.number))
        _log_study_plots(study)

        final = train(with_values(config, best.params), nested=True)
        mlflow.set_tag("final_run_id", final.run_id)
        mlflow.log_metrics({f"final_{k}": v for k, v in final.metrics.items() if k.startswith("test_")})
    return TuneResult(name, parent.info.run_id, best.value, best.params, counts, final, config.train.monitor)


def work(config: ExperimentConfig, study: optuna.Study, parent_run_id: str, storage_url: str, worker_index: int) -> None:
    """Ask, train, tell — until the study has ``tuning.trials`` finished trials.

    "Count, then ask" runs under one lock for every worker of the study (:func:`study_lock`), so
    parallel workers, on one machine or many, stop at exactly N finished trials. On a database
    storage a worker that finds the last trials taken by others waits for them: a trial whose
    worker died stops sending heartbeats, is failed and queued again, and is then taken here.
    """
    target = config.tuning.trials
    heartbeats = _has_heartbeats(study)
    poll = min(max(config.tuning.heartbeat_interval / 2, 1.0), 10.0)
    while True:
        with study_lock(storage_url, study.study_name):
            with warnings.catch_warnings():  # Optuna marks it experimental; it has been so since 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state in FINISHED for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            failed = sum(t.state == TrialState.FAIL for t in trials)
            if finished >= target or (finished + running >= target and not heartbeats):
                return
            if failed >= max(target, 3):
                raise TuningError(f"{failed} trials of study {study.study_name} failed; fix the cause (see their "
                                  "fail_reason) before tuning on")
            trial = study.ask() if finished + running < target else None
            if trial is not None:
                if heartbeats:
                    study._storage.record_heartbeat(trial._trial_id)
                trial.set_user_attr("process", process_id())
        if trial is None:  # the last trials run elsewhere: wait for them, or for their heartbeats to stop
            time.sleep(poll)
            continue
        with _heartbeat(study, trial, config.tuning.heartbeat_interval, enabled=heartbeats):
            _run_trial(config, study, trial, parent_run_id, worker_index)


def _run_trial(config, study, trial, parent_run_id, worker_index) -> None:
    """One trial as one nested MLflow run: train, then tell Optuna COMPLETE, PRUNED or FAIL."""
    import keras
    from optuna_integration import KerasPruningCallback

    monitor = config.train.monitor
    tags = {"optuna.study": study.study_name, "optuna.trial": str(trial.number), "role": "trial",
            "worker": str(worker_index)}
    retry_of = study._storage.get_trial(trial._trial_id).system_attrs.get("retry_history")  # set on a retry
    if retry_of:
        tags["optuna.retry_of"] = str(retry_of[-1])
    run = start_run(run_name=f"trial-{trial.number}", nested=True, parent_run_id=parent_run_id,
                    system_metrics_interval=config.mlflow.system_metrics_interval, tags=tags)
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    try:
        try:
            values = suggest(trial, config.tuning.search_space)
            keras.backend.clear_session()
            result = train(with_values(config, values), callbacks=[KerasPruningCallback(trial, monitor)],
                           own_run=False, log_model=False, evaluate_test=False)
            value = best_value(result.history.get(monitor, []), monitor)
            if not math.isfinite(value):
                raise TuningError(f"{monitor} was never finite in this trial")
        except optuna.TrialPruned as exc:
            # MLflow has no pruned status: the run ends FINISHED, named and described as pruned in the UI
            mlflow.set_tags({"optuna.state": "PRUNED", "pruned_reason": str(exc),
                             "mlflow.runName": f"trial-{trial.number}-pruned",
                             "mlflow.note.content": f"Pruned by Optuna: {exc}"})
            study.tell(trial, state=TrialState.PRUNED)
            mlflow.end_run("FINISHED")
            print(f"trial {trial.number}: pruned ({exc})", flush=True)
        except KeyboardInterrupt:
            _fail(study, trial, "interrupted")
            mlflow.end_run("KILLED")
            raise
        except Exception as exc:  # noqa: BLE001 - a failing trial is recorded and the study goes on
            reason = f"{type(exc).__name__}: {exc}"[:500]
            _fail(study, trial, reason)
            mlflow.end_run("FAILED")
            print(f"trial {trial.number}: failed ({reason})", flush=True)
        else:
            mlflow.log_metric("trial_value", value)
            mlflow.set_tag("optuna.state", "COMPLETE")
            study.tell(trial, value)
            mlflow.end_run("FINISHED")
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            print(f"trial {trial.number}: {monitor} {value:.4g} with {shown}", flush=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Another worker found this trial's heartbeats late (a stalled or overloaded machine), failed it and
        # queued it again: that copy counts, this one ends here.
        mlflow.set_tags({"optuna.state": "FAIL", "fail_reason": LATE_HEARTBEATS})
        mlflow.end_run("FAILED")


def _fail(study, trial, reason: str) -> None:
    trial.set_user_attr("fail_reason", reason)
    mlflow.set_tags({"optuna.state": "FAIL", "fail_reason": reason})
    study.tell(trial, state=TrialState.FAIL)


def _worker_main(config, storage_url, parent_run_id, experiment_id, index, parent_pid) -> None:
    """Entry point of a helper process (spawned): trials only, under the parent's MLflow run."""
    die_with_parent(parent_pid)
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_experiment(experiment_id=experiment_id)
    study = _load_study(config, storage_url, seed_offset=index)
    work(config, study, parent_run_id, storage_url, worker_index=index)


def _load_study(config: ExperimentConfig, storage_url: str, seed_offset: int = 0) -> optuna.Study:
    tuning = config.tuning
    if tuning.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=tuning.n_startup_trials,
                                             n_warmup_steps=tuning.n_warmup_steps)
    elif tuning.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=config.train.epochs)
    else:
        pruner = optuna.pruners.NopPruner()
    storage = open_storage(storage_url, tuning)
    return optuna.create_study(
        study_name=study_name(config), storage=storage, load_if_exists=True,
        direction=metric_goal(config.train.monitor), pruner=pruner,
        sampler=optuna.samplers.TPESampler(seed=tuning.sampler_seed + seed_offset),
    )


def _recover_dead(study: optuna.Study) -> None:
    """Trials left RUNNING by a process that died on this machine become FAIL (their MLflow runs are
    marked FAILED by every command that opens the store: :func:`spinemri.tracking.runs.reap_dead_runs`).

    A database storage has heartbeats instead, which find a dead worker on any machine, fail its trial
    and queue it again (:func:`_retry_stale_trial`).
    """
    if _has_heartbeats(study):
        return
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if process_gone(str(trial.user_attrs.get("process", ""))):
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "its process died (killed or crashed)")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def _has_heartbeats(study: optuna.Study) -> bool:
    """Database storages (:func:`open_storage`) record heartbeats; a journal file does not."""
    return getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None


@contextlib.contextmanager
def study_lock(storage_url: str, name: str):
    """One holder at a time for the study ``name``, across every process and machine that shares the storage.

    PostgreSQL: a session advisory lock (``pg_advisory_lock``), released by the server when the holder's
    connection ends, even if its process is killed; MySQL: ``GET_LOCK``; a sqlite database or a journal
    file (one machine): a file lock beside it.
    """
    if "://" not in storage_url:
        with exclusive_lock(f"{storage_url}{LOCK_SUFFIX}"):  # not ".lock": Optuna's own journal lock
            yield
        return
    dialect = urlparse(storage_url).scheme.split("+", 1)[0]
    if dialect == "sqlite":
        database = sqlite_path(storage_url)
        if database is None:  # in memory: this process only
            yield
            return
        with exclusive_lock(f"{database}{LOCK_SUFFIX}"):
            yield
        return
    if dialect not in ("postgresql", "mysql"):
        raise TuningError(f"storage {redact(storage_url)}: parallel workers are coordinated on postgresql, mysql or "
                          "sqlite databases and journal files; use one of those for --storage")
    import sqlalchemy

    engine = _lock_engine(storage_url)
    key = int.from_bytes(hashlib.sha256(f"spinemri-tune:{name}".encode()).digest()[:8], "big", signed=True)
    with engine.connect() as connection:
        if dialect == "postgresql":
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            unlock = sqlalchemy.text("SELECT pg_advisory_unlock(:key)")
        else:
            connection.execute(sqlalchemy.text("SELECT GET_LOCK(:key, -1)"), {"key": str(key)})
            unlock = sqlalchemy.text("SELECT RELEASE_LOCK(:key)")
        try:
            yield
        finally:
            connection.execute(unlock, {"key": key if dialect == "postgresql" else str(key)})


@functools.lru_cache(maxsize=4)
def _lock_engine(storage_url: str):
    """A connection per lock, none kept open between them: the lock lives exactly as long as its holder."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    return sqlalchemy.create_engine(storage_url, poolclass=NullPool)


@contextlib.contextmanager
def _heartbeat(study: optuna.Study, trial: optuna.Trial, interval: int, enabled: bool):
    """Record the trial's heartbeat every ``interval`` seconds from a thread while the block runs."""
    if not enabled:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                study._storage.record_heartbeat(trial._trial_id)
            except Exception as exc:  # noqa: BLE001 - a lost database connection; the next beat retries
                print(f"warning: heartbeat of trial {trial.number} not recorded ({type(exc).__name__}); retrying",
                      file=sys.stderr)

    thread = threading.Thread(target=beat, name=f"optuna-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _retry_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker stopped sending heartbeats (Optuna has just made it FAIL): end its MLflow run FAILED
    with the reason, and queue it again with the same parameters (its ``failed_trial`` system attribute)."""
    reason = ("its worker stopped sending heartbeats for longer than tuning.grace_period (killed, crashed or cut off); "
              "retried by another worker")
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        try:
            client = mlflow.MlflowClient()
            client.set_tag(run_id, "fail_reason", reason)
            client.set_tag(run_id, "optuna.state", "FAIL")
            client.set_terminated(run_id, "FAILED")
        except Exception as exc:  # noqa: BLE001 - the trial is retried whatever the tracking store says
            print(f"warning: MLflow run {run_id} of stale trial {trial.number} not marked FAILED ({exc})",
                  file=sys.stderr)
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)


def _log_study_plots(study: optuna.Study) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    for name, plot in (("optimization_history", ov.plot_optimization_history),
                       ("param_importances", ov.plot_param_importances),
                       ("parallel_coordinate", ov.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                # Optuna marks its matplotlib plots experimental; matplotlib warns of a flat axis (equal values)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.filterwarnings("ignore", message="Attempting to set identical", category=UserWarning)
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. too few complete trials
            mlflow.log_text(f"{name} not drawn: {exc}\n", f"study/{name}.txt")
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(8, 5)
        mlflow.log_figure(figure, f"study/{name}.png")
        plt.close(figure)
    frame = study.trials_dataframe()
    mlflow.log_text(frame.to_csv(index=False), "study/trials.csv")

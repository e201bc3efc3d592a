"""An MLflow run's life, as every spinemri command that trains or logs lives it.

Every run is started with :func:`start_run`, which tags it with the process that owns it
(``process``: host, pid and start time), and ended by :func:`ending_run`: FINISHED, KILLED on
Ctrl-C or ``kill``, FAILED on any error. A process killed with SIGKILL (or by the kernel's OOM
killer) ends nothing; :func:`reap_dead_runs`, run by every command that opens the store, finds its
runs by that tag and marks them FAILED with the reason.

Both trainers (the classifier's and the localizers') open their run with :func:`training_run`
(start or continue, tags, params, config.yaml, end) and register their model with
:func:`register_and_tag`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
import os
from pathlib import Path
import platform
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.exceptions import MlflowException
import pandas as pd

from spinemri.errors import CardError
from spinemri.metrics.floor import FLOOR, Verdict
from spinemri.metrics.headline import headline_metrics
from spinemri.processes import HOST, process_gone, process_id
from spinemri.tracking import registry
from spinemri.tracking.card import attach_card

CV_ROLE, FOLD_ROLE = "cv", "fold"  # the tag `role` of a cross-validation's parent run and of each fold's run
CV_SCORE = "cv_rsna_score"  # a cross-validation's headline: the RSNA score of its out-of-fold predictions
PROCESS_TAG = "process"  # host:pid:start time of the process that owns a RUNNING run (spinemri.processes)


def start_run(*, tags: dict[str, str] | None = None, system_metrics_interval: float = 0.0, **kwargs
              ) -> mlflow.ActiveRun:
    """``mlflow.start_run`` with the run marked as this process's, so that the run of a process that
    dies without ending it is found and marked FAILED (:func:`reap_dead_runs`). With
    ``system_metrics_interval`` (seconds, the setting mlflow.system_metrics_interval) MLflow samples the
    machine's CPU, memory, disk and GPU use into the run's system/* metrics while it is active."""
    if system_metrics_interval > 0:
        from mlflow.system_metrics import set_system_metrics_sampling_interval

        set_system_metrics_sampling_interval(system_metrics_interval)
        kwargs["log_system_metrics"] = True
    return mlflow.start_run(tags={PROCESS_TAG: process_id(), **(tags or {})}, **kwargs)


# Modules in which an interrupt must not land: a store write cut in half can leave the store
# unable to record the run's end (a SQLAlchemy session or sqlite transaction left open).
TRACKING_MODULES = frozenset({"mlflow", "sqlalchemy", "alembic", "sqlite3", "psycopg", "urllib3", "requests",
                              "http"})
MAX_DEFER_S = 15.0  # the longest an interrupt waits for tracking code to return
_RECHECK_S = 0.05


@dataclass
class _Interrupts:
    pending: int = 0  # the signal waiting to become KeyboardInterrupt, 0 if none
    since: float | None = None
    ending: bool = False  # the run is being ended: hold every interrupt until it is


@contextlib.contextmanager
def ending_run():
    """End the active run FINISHED, KILLED (Ctrl-C, kill) or FAILED (any error): never left RUNNING.

    In the block, SIGINT and SIGTERM raise KeyboardInterrupt (the run ends KILLED), but never inside
    MLflow's store code: there the interrupt waits until that code returns (at most MAX_DEFER_S),
    and while the run is being ended it waits until the end is recorded. A process killed with
    SIGKILL cannot end its run; the next spinemri command marks such runs FAILED
    (:func:`reap_dead_runs`).
    """
    state = _Interrupts()
    with _interrupts_outside_tracking(state):
        try:
            yield
        except KeyboardInterrupt:
            state.ending = True
            _end_run("KILLED", raising=False)
            raise
        except BaseException:
            state.ending = True
            _end_run("FAILED", raising=False)
            raise
        state.ending = True
        _end_run("FINISHED", raising=True)


def _end_run(status: str, *, raising: bool) -> None:
    """mlflow.end_run(status), once more through a fresh client if the store failed the first time."""
    run = mlflow.active_run()
    if run is None:
        return
    try:
        mlflow.end_run(status)
        return
    except Exception as first:  # noqa: BLE001 - any store failure: try once more, then say what happens
        try:
            mlflow.MlflowClient().set_terminated(run.info.run_id, status)
            return
        except Exception:  # noqa: BLE001
            if raising:
                raise first from None
            print(f"warning: run {run.info.run_id} could not be marked {status} ({type(first).__name__}: {first}); "
                  "the next spinemri command marks it FAILED", file=sys.stderr, flush=True)


def _in_tracking_code(frame) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").partition(".")[0] in TRACKING_MODULES:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _interrupts_outside_tracking(state: _Interrupts):
    """SIGINT/SIGTERM -> KeyboardInterrupt at the first moment the main thread is outside tracking code."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        state.pending = state.pending or signum
        state.since = state.since if state.since is not None else time.monotonic()
        if state.ending:
            return  # raised, if need be, once the run's end is recorded
        if _in_tracking_code(frame) and time.monotonic() - state.since < MAX_DEFER_S:
            signal.setitimer(signal.ITIMER_REAL, _RECHECK_S)  # look again shortly
            return
        signum, state.pending, state.since = state.pending, 0, None
        raise KeyboardInterrupt(f"received signal {signum}")

    def recheck(signum, frame):
        if state.pending:
            interrupt(state.pending, frame)

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGINT, interrupt), (signal.SIGTERM, interrupt), (signal.SIGALRM, recheck))}
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if state.pending:  # arrived while the run was being ended, after the block had finished
        raise KeyboardInterrupt(f"received signal {state.pending}")


RESUMED_FROM_TAG = "resumed_from_status"  # set while a finished run is reopened to log into it


def reap_dead_runs(client: mlflow.MlflowClient | None = None) -> list[str]:
    """Mark FAILED every RUNNING run whose owning process ran on this host and no longer exists.

    A run reopened by ``spinemri evaluate`` gets back the status it had. Returns the run ids changed.
    """
    client = client or mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    reaped: list[str] = []
    if not experiments:
        return reaped
    runs = client.search_runs(experiments, filter_string=f"attributes.status = 'RUNNING' and "
                                                        f"tags.{PROCESS_TAG} LIKE '{HOST}:%'", max_results=10_000)
    for run in runs:
        owner = run.data.tags.get(PROCESS_TAG, "")
        if not process_gone(owner):
            continue
        previous = run.data.tags.get(RESUMED_FROM_TAG)
        if previous:
            client.set_terminated(run.info.run_id, previous, end_time=run.info.end_time)
            client.delete_tag(run.info.run_id, RESUMED_FROM_TAG)
        else:
            client.set_tag(run.info.run_id, "fail_reason", f"its process ({owner}) died without ending the run "
                           "(killed or crashed); marked FAILED by the next spinemri command")
            client.set_terminated(run.info.run_id, "FAILED")
        reaped.append(run.info.run_id)
    return reaped


# --- the run of one training ------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a training run produced (the classifier's or a localizer's)."""

    run_id: str
    metrics: dict[str, float]
    model_uri: str | None
    epochs_trained: int
    history: dict[str, list[float]] = field(default_factory=dict)
    registered: registry.Decision | None = None
    verdict: Any = None  # spinemri.metrics.floor.Verdict: how the model compares with its floor, if judged


# The experiment tag MLflow's UI reads to open an experiment in its model-training view (runs, charts, the
# registry) rather than the GenAI one (traces); spinemri's experiments are all model training.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def use_experiment(name: str):
    """Make ``name`` the active experiment (created if need be), tagged as model training for the UI."""
    experiment = mlflow.set_experiment(name)
    mark_model_training(experiment)
    return experiment


def mark_model_training(experiment) -> None:
    """Tag ``experiment`` (an MLflow Experiment) as model training, unless it is already."""
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


@contextlib.contextmanager
def training_run(*, experiment: str, config: Mapping[str, Any], tags: Mapping[str, str], params: Mapping[str, Any],
                 run_name: str | None = None, nested: bool = False, own_run: bool = True
                 ) -> Iterator[mlflow.ActiveRun]:
    """The MLflow run of one training, opened the same way by both trainers.

    Starts a run in ``experiment`` — or continues the one ``mlflow run`` opened (MLFLOW_RUN_ID) —
    tags it (``tags``, the run name), logs ``params`` (but not the ones ``mlflow run`` already logged
    from its -P parameters, which have the same names) and ``config`` as config.yaml, samples system
    metrics every ``mlflow.system_metrics_interval`` seconds of ``config``, and ends it
    FINISHED, KILLED or FAILED (:func:`ending_run`). ``own_run=False`` logs into the caller's active
    run and leaves its start and end to the caller (an Optuna trial).
    """
    with contextlib.ExitStack() as stack:
        if own_run:
            opened_by_mlflow_run = bool(os.environ.get("MLFLOW_RUN_ID"))  # mlflow.start_run takes it out
            if not nested and not opened_by_mlflow_run:
                use_experiment(experiment)
            interval = float((config.get("mlflow") or {}).get("system_metrics_interval", 0) or 0)
            run = start_run(run_name=run_name, nested=nested, system_metrics_interval=interval)
            if opened_by_mlflow_run:  # `mlflow run` made the experiment, and the run
                mark_model_training(mlflow.get_experiment(run.info.experiment_id))
            stack.enter_context(ending_run())
        else:
            run = mlflow.active_run()
            if run is None:
                raise RuntimeError("training_run(own_run=False) needs an active MLflow run")
        mlflow.set_tags({**tags, **({"mlflow.runName": run_name} if run_name else {})})  # `mlflow run` names it too
        # `mlflow run` has logged the parameters it was given (-P lr=1e-3): those names stay as typed.
        given = mlflow.get_run(run.info.run_id).data.params
        mlflow.log_params({k: v for k, v in params.items() if k not in given})
        mlflow.log_dict(dict(config), "config.yaml")
        yield run


def describe_run(verdict: "Verdict | None", *lines: str) -> str:
    """The run's description (``mlflow.note.content``, shown at the top of its page in the MLflow UI): the
    verdict's sentence first, then ``lines``. Returns the text."""
    first = verdict.sentence if verdict is not None else f"No verdict against {FLOOR} (see the run's output)."
    text = "\n\n".join([first, *[line for line in lines if line]])
    mlflow.set_tag("mlflow.note.content", text)
    return text


def log_headline(metrics: Mapping[str, float], champion_metric: str | None = None) -> dict[str, float]:
    """Log the run's headline (spinemri.metrics.headline) as ``headline/<name>``, rounded, into the active run:
    the first charts of its page in the MLflow UI. Returns what was logged."""
    logged = headline_metrics(metrics, champion_metric)
    if logged:
        mlflow.log_metrics(logged)
    return logged


def log_split(table: pd.DataFrame) -> None:
    """The study-level split a run trained on (study_id, split), as data/splits.csv: what held-out checks read."""
    mlflow.log_text(table.to_csv(index=False), "data/splits.csv")


def register_and_tag(model_uri: str, name: str, *, metric: str, value: float | None, eval_set: str,
                     tags: Mapping[str, str], champion: str = registry.CHAMPION,
                     challenger: str = registry.CHALLENGER, policy: str = "paired",
                     evidence: pd.DataFrame | None = None, verdict=None,
                     allow_below_floor: bool = False, needs_floor: bool = True) -> registry.Decision:
    """Register the active run's model under the alias policy of :mod:`spinemri.tracking.registry` (``verdict``:
    how it compares with its floor), record the decision on the run, and print it."""
    decision = registry.register(model_uri, name, metric=metric, value=value, eval_set=eval_set, tags=dict(tags),
                                 champion=champion, challenger=challenger, policy=policy, evidence=evidence,
                                 verdict=verdict, allow_below_floor=allow_below_floor, needs_floor=needs_floor)
    # The alias the version got when registered, named as such: aliases move on, the registry has the current one.
    mlflow.set_tags({"registered_model": decision.name, "registered_version": decision.version,
                     "alias_when_registered": decision.alias})
    print(decision, flush=True)
    if needs_floor:  # a model judged against its floor gets its card
        try:
            attach_card(decision.name, str(decision.version))
        except CardError as exc:  # the model is registered all the same; the run says why it has no card
            mlflow.set_tag("card", f"not written: {exc}")
    return decision


# --- what a run records about where it ran ------------------------------------------------------

REPO_DIR = Path(__file__).resolve().parents[3]  # the checkout, for the git commit
TRACKED_PACKAGES = ("spinemri", "tensorflow", "keras", "mlflow", "numpy", "pandas", "scikit-learn", "pydicom",
                    "opencv-python-headless")
# What the logged model needs to run (its own package travels as code).
MODEL_REQUIREMENTS = ("tensorflow", "keras", "mlflow", "numpy", "pandas", "scikit-learn", "pydicom", "pylibjpeg",
                      "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "opencv-python-headless", "pyyaml",
                      "click", "tqdm")


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_description() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return f"{len(gpus)} GPU(s): " + ", ".join(g.name for g in gpus)
    return f"CPU ({platform.processor() or platform.machine()})"


def run_tags(fingerprint: str, arch: str, task: str) -> dict[str, str]:
    tags = {
        "git_commit": git_commit(),
        "data_fingerprint": fingerprint,
        "device": device_description(),
        "arch": arch,
        "task": task,
        "python": platform.python_version(),
    }
    tags.update({f"version.{name}": package_version(name) for name in TRACKED_PACKAGES})
    return tags


def pip_requirements() -> list[str]:
    return [f"{name}=={package_version(name)}" for name in MODEL_REQUIREMENTS
            if package_version(name) != "not installed"]


def logged_table(run_id: str, artifact: str) -> pd.DataFrame | None:
    """An MLflow table (``mlflow.log_table``) a run logged, or None where it has none."""
    try:
        table = mlflow.artifacts.load_dict(f"runs:/{run_id}/{artifact}")
    except (MlflowException, OSError):
        return None
    return pd.DataFrame(table["data"], columns=table["columns"])


def log_figure(figure, path: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, path)
    plt.close(figure)

"""The fit loop's parts shared by every trainer: seeding, devices, the callback stack, the best weights.

Both the classifier (spinemri.training.classifier) and the localizers (spinemri.training.localizer)
fit with :func:`callbacks` — NaN stop, best checkpoint, early stopping and LR schedule watching one
monitor whose direction :func:`spinemri.metrics.goals.metric_goal` decides, and per-epoch MLflow
metrics — inside :func:`best_weights`, and check the result with :func:`check_finite`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from pathlib import Path
import sys
import tempfile
import threading
import time
from typing import Iterator, Sequence

import keras
import mlflow
import numpy as np
import pandas as pd

from spinemri.config import TrainConfig
from spinemri.errors import ConfigError, TrainingError
from spinemri.metrics.goals import keras_mode
from spinemri.training import cluster

HISTORY_ARTIFACT = "training/history.json"  # every Keras epoch metric, one row per epoch (an MLflow table)


def curve_metrics(logs: dict) -> dict[str, float]:
    """The per-epoch metrics a run charts: the total loss, every validation metric, the learning rate.
    Per-output training metrics (and Keras's own copy of the learning rate) stay in HISTORY_ARTIFACT."""
    return {k: float(v) for k, v in logs.items() if k in ("loss", "lr") or k.startswith("val_")}


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs each epoch's :func:`curve_metrics` to the active run, and every epoch row so far (train and
    validation, every output, the learning rate; the stages of a fit that shares this callback together) to
    the table HISTORY_ARTIFACT, so that a pruned or interrupted fit keeps the epochs it ran."""

    def __init__(self, step_offset: int = 0):
        super().__init__()
        self.step_offset = step_offset
        self.rows: list[dict[str, float]] = []

    def on_epoch_end(self, epoch, logs=None):
        row = {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
        try:
            row["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        except (AttributeError, TypeError, ValueError):
            pass
        step = epoch + self.step_offset
        mlflow.log_metrics(curve_metrics(row), step=step)
        self.rows.append({"epoch": step, **row})
        table = pd.DataFrame(self.rows)
        if len(self.rows) == 1:
            mlflow.log_table(table, HISTORY_ARTIFACT)  # registers the run's table; nothing logged yet to append to
        else:  # the whole table again, as log_table writes it: log_table would download the logged one to append
            mlflow.log_text(table.to_json(orient="split", index=False), HISTORY_ARTIFACT)


class ProgressLines(keras.callbacks.Callback):
    """The terminal's view of a fit: a line per epoch (rounded losses, the monitor, seconds) and, while an
    epoch runs, a line at least every ``every_s`` seconds, so that no step looks stalled: a watcher thread
    speaks for a batch that takes long (the first one builds the graph) and for the validation pass. Keras
    calls no callback when a fit raises, so the watcher also ends once the thread it watches is no longer
    inside a Keras ``fit``."""

    def __init__(self, monitor: str, every_s: float = 10.0):
        super().__init__()
        self.monitor, self.every_s = monitor, every_s
        self.epochs = self.steps = self.epoch = self.batches = 0
        self.started = self.last = 0.0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._fitting = 0  # the thread running the fit

    def on_train_begin(self, logs=None):
        self.epochs = int(self.params.get("epochs") or 0)
        self.steps = int(self.params.get("steps") or 0)
        self._stop.clear()
        self._fitting = threading.get_ident()
        self._watcher = threading.Thread(target=self._watch, name="progress-lines", daemon=True)
        self._watcher.start()

    def on_train_end(self, logs=None):
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=1)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.batches = epoch, 0
        self.started = self.last = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        self.batches = batch + 1

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.every_s)) and self._inside_fit():
            now = time.monotonic()
            if self.started and now - self.last >= self.every_s:
                self.last = now
                print(f"  epoch {self.epoch + 1}/{self.epochs}: {self._where()}, {now - self.started:.0f} s", flush=True)

    def _inside_fit(self) -> bool:
        """Whether the thread that began the fit is still in Keras's ``fit`` (it is not once the fit raised)."""
        frame = sys._current_frames().get(self._fitting)
        while frame is not None:
            if frame.f_code.co_name == "fit" and "keras" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False

    def _where(self) -> str:
        if self.steps and self.batches >= self.steps:
            return "validating"
        of = f"/{self.steps}" if self.steps else ""
        return f"batch {self.batches + 1}{of}"

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        shown = [k for k in ("loss", "val_loss", self.monitor) if k in logs]
        values = ", ".join(f"{k} {float(logs[k]):.4g}" for k in dict.fromkeys(shown))
        print(f"epoch {epoch + 1}/{self.epochs}: {values} ({time.monotonic() - self.started:.0f} s)",
              flush=True)
        self.last = time.monotonic()


def step(text: str) -> None:
    """A line as a step of a few seconds or more begins after the epochs (evaluation, Grad-CAM, logging
    the model), in the style of the epoch lines."""
    print(f"  {text}", flush=True)


@contextlib.contextmanager
def best_weights(model: keras.Model) -> Iterator[Path]:
    """A checkpoint path for :func:`callbacks`; on a normal exit the model gets the best weights saved there."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "best.weights.h5"
        yield path
        if path.is_file():
            model.load_weights(path)


def callbacks(cfg: TrainConfig, monitor: str, best: Path, *, first: Sequence[keras.callbacks.Callback] = (),
              extra: Sequence[keras.callbacks.Callback] = (), step_offset: int = 0, tracked: bool = True,
              initial: float | None = None) -> list[keras.callbacks.Callback]:
    """The callback stack of every spinemri fit, in order: ``first`` (callbacks that add metrics to the
    epoch logs the others read), NaN stop, best checkpoint, early stopping, LR schedule, MLflow
    metrics (step = epoch + ``step_offset``; not with ``tracked=False``, a worker other than the chief
    of a multi-worker training), then ``extra`` (e.g. Optuna's pruning callback). ``initial``: the
    monitor's value of the weights already saved at ``best`` (the untrained model), which an epoch
    must beat to replace them. The progress lines (:class:`ProgressLines`) take the place of Keras's own: fit
    with ``verbose=0``."""
    mode = keras_mode(monitor)
    return [
        *first,
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.ModelCheckpoint(best, monitor=monitor, mode=mode, save_best_only=True, save_weights_only=True,
                                        initial_value_threshold=initial),
        keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=cfg.early_stopping_patience),
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, factor=0.5, patience=cfg.reduce_lr_patience),
        *([MlflowEpochLogger(step_offset)] if tracked else []),
        ProgressLines(monitor),
        *extra,
    ]


def weights_digest(model: keras.Model) -> str:
    """sha256 (hex) of every weight of ``model``, trainable or not, in order: the same for the same weights
    (every worker of a multi-worker training; two runs with ``train.deterministic``)."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()


def check_finite(history: dict[str, list[float]], what: str, lr: float) -> None:
    """Refuse a fit whose loss became NaN or infinite (TerminateOnNaN stopped it)."""
    losses = history.get("loss", [])
    if any(not math.isfinite(v) for v in losses):
        raise TrainingError(f"{what}'s loss became NaN/inf after {len(losses)} epoch(s) (lr={lr}); lower train.lr "
                            "or check the data")


def seed_everything(cfg) -> None:
    """Seed Python, NumPy and TensorFlow with ``train.seed``; with ``train.deterministic`` also make
    TensorFlow's ops deterministic, so that a second run gives the same weights and metrics. That
    switch cannot be turned off again in the process."""
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def check_devices(cfg) -> None:
    """Refuse train.mixed_precision=on without a GPU: float16 on a CPU is emulated, slower than
    float32, with no memory to gain (auto simply stays float32 there)."""
    import tensorflow as tf

    if cfg.mixed_precision == "on" and not tf.config.list_logical_devices("GPU"):
        raise ConfigError("train.mixed_precision=on needs a GPU and TensorFlow sees none; use "
                          "--mixed-precision auto (float32 on a CPU) or off")


@contextlib.contextmanager
def distribution(cfg):
    """The device placement of one run: yields (tf.distribute strategy, run tags).

    Inside, Keras's dtype policy is ``mixed_float16`` when ``train.mixed_precision`` says so (auto:
    iff a GPU is visible); a model built and compiled in ``strategy.scope()`` is mirrored over its
    replicas, and ``train.batch_size`` is then the global batch, split evenly over them.
    ``mirrored`` uses every visible GPU, or every logical CPU device where there is no GPU (one on
    a plain machine, two in the tests). ``multiworker`` uses the cluster this process joined
    (:mod:`spinemri.training.cluster`: every worker's GPUs, or its CPU), adds the tags ``workers``
    and ``cluster``, and turns a worker that stops responding into a TrainingError naming it. The
    previous policy comes back on exit.
    """
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    check_devices(cfg)
    mixed = cfg.mixed_precision == "on" or (cfg.mixed_precision == "auto" and bool(gpus))
    failures = contextlib.nullcontext()
    if cfg.strategy == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
    elif cfg.strategy == "multiworker":
        workers, strategy = cluster.joined()
        failures = cluster.naming_stopped_workers(workers, cfg.worker_timeout_s)
    else:
        strategy = tf.distribute.get_strategy()  # the default: the one device TensorFlow picks
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    tags = {"strategy": cfg.strategy, "replicas": str(strategy.num_replicas_in_sync),
            "mixed_precision": "mixed_float16" if mixed else "off"}
    if cfg.strategy == "multiworker":
        tags.update(workers=str(len(workers.workers)), cluster=",".join(workers.workers))
    try:
        with failures:
            yield strategy, tags
    finally:
        keras.mixed_precision.set_global_policy(previous)

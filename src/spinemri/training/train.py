"""train(config): data -> model -> compile -> fit -> evaluate -> log, in one MLflow run.

The same function serves `spinemri train`, the MLproject `main` entry point and (nested, with a
pruning callback) every Optuna trial.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd

from spinemri import evaluate, registry
from spinemri.config import HEADS, ConfigError, ExperimentConfig
from spinemri.data import cache
from spinemri.data.dicom import series_order
from spinemri.data.phantom import PhantomConfig, synthesize
from spinemri.data.readers import DatasetError
from spinemri.data.splits import SPLITS
from spinemri.errors import UserError
from spinemri.models.backbones import get_backbone
from spinemri.models.gradcam import log_gradcam
from spinemri.models.network import HEAD_CLASSES, build_model, set_backbone_trainable
from spinemri.models.pyfunc import example_row, log_classifier
from spinemri.training import evaluation, plots
from spinemri.training.data import SplitData, make_dataset, read_rows, split_data
from spinemri.study import prior_from_samples
from spinemri.runs import ending_run, start_run
from spinemri.training.tracking import MlflowEpochLogger, log_figure, pip_requirements, run_tags


class TrainingError(UserError, RuntimeError):
    """Training could not produce a model (e.g. the loss became NaN)."""


@dataclass
class TrainResult:
    run_id: str
    metrics: dict[str, float]
    model_uri: str | None
    epochs_trained: int
    history: dict[str, list[float]] = field(default_factory=dict)
    registered: registry.Decision | None = None


def phantom_dir(config: ExperimentConfig) -> Path:
    """Where the built-in phantom for this config lives (generated once, then reused)."""
    return cache.default_cache_dir().parent / "phantom" / f"studies{config.data.phantom_studies}-seed{config.data.phantom_seed}"


def resolve_data_dir(config: ExperimentConfig) -> Path:
    """config.data.data_dir, or the built-in phantom (written on first use) when it is empty."""
    data_dir = config.data.data_dir
    if not data_dir:
        data_dir = phantom_dir(config)
        if not (data_dir / "train.csv").is_file():
            synthesize(data_dir, PhantomConfig(studies=config.data.phantom_studies, seed=config.data.phantom_seed),
                       workers=config.data.workers)
    elif not Path(data_dir).exists():
        raise DatasetError([f"data_dir {data_dir} does not exist; give an RSNA-layout folder or a flat CSV, "
                            "or leave data_dir empty for the built-in phantom"])
    return Path(data_dir)


def prepare_data(config: ExperimentConfig) -> tuple[cache.PreparedDataset, pd.DataFrame]:
    """The cache for this config (the phantom when data_dir is empty) and its samples with splits."""
    data_dir = resolve_data_dir(config)
    dataset = cache.prepare(data_dir, config.preprocessing, workers=config.data.workers,
                            split_fractions=config.split.fractions, split_seed=config.split.seed)
    return dataset, dataset.samples_with_split(config.split.fractions, config.split.seed)


def best_value(history: dict[str, list[float]], monitor: str) -> float:
    """The best value a metric reached: the minimum of a loss, the maximum of anything else."""
    values = [v for v in history.get(monitor, []) if math.isfinite(v)]
    if not values:
        return float("nan")
    return min(values) if "loss" in monitor else max(values)


def train(config: ExperimentConfig, *, callbacks=(), nested: bool = False, log_model: bool = True,
          evaluate_test: bool = True, own_run: bool = True) -> TrainResult:
    """Train, evaluate on the test split and log everything to one MLflow run (see README).

    ``own_run=False`` logs into the caller's active run and leaves its status to the caller
    (an Optuna trial); ``evaluate_test=False`` skips the test split (trials are chosen on
    validation, never on test).
    """
    config.validate()
    check_devices(config.train)
    backbone = get_backbone(config.model.arch)
    backbone.check_size(config.preprocessing.img_size)
    dataset, samples = prepare_data(config)
    splits = {name: split_data(samples, name) for name in SPLITS}
    for name, part in splits.items():
        if not (part.targets["severity"] >= 0).any():
            raise DatasetError([f"{config.data.data_dir or 'the phantom'} has no labelled samples in the {name} "
                                f"split ({len(part)} samples); use more studies or other split.fractions"])
    seed_everything(config.train)

    run_name = f"{config.model.arch}-{datetime.now():%Y%m%d-%H%M%S}"
    if not own_run:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("train(own_run=False) needs an active MLflow run")
        result = _train_in_run(config, dataset, splits, None, callbacks, log_model, evaluate_test)
        result.run_id = active.info.run_id
        return result
    if not nested and not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(config.mlflow.experiment)
    run = start_run(run_name=run_name, nested=nested)
    with ending_run():
        result = _train_in_run(config, dataset, splits, run_name, callbacks, log_model, evaluate_test)
    result.run_id = run.info.run_id
    return result


def _train_in_run(config: ExperimentConfig, dataset: cache.PreparedDataset, splits: dict[str, SplitData],
                  run_name: str | None, extra_callbacks, log_model: bool, evaluate_test: bool) -> TrainResult:
    cfg, pre = config.train, config.preprocessing
    mlflow.set_tags(run_tags(dataset.fingerprint, config.model.arch, config.task))
    if run_name:  # a run started by `mlflow run` gets our name too
        mlflow.set_tag("mlflow.runName", run_name)
    # The search space stays in config.yaml; the task is a tag (and an MLproject parameter that
    # `mlflow run` logs as given, possibly empty).
    mlflow.log_params({k: v for k, v in config.flat().items() if not k.startswith("tuning.search_space.") and k != "task"})
    mlflow.log_params({f"split.{name}_samples": len(part) for name, part in splits.items()})
    mlflow.log_params({f"split.{name}_studies": int(part.samples["study_id"].nunique()) for name, part in splits.items()})
    mlflow.log_dict(config.to_dict(redacted=True), "config.yaml")
    mlflow.log_text(dataset.splits(config.split.fractions, config.split.seed).to_csv(index=False), "data/splits.csv")

    with distribution(cfg) as (strategy, tags):
        mlflow.set_tags(tags)
        replicas = strategy.num_replicas_in_sync
        with strategy.scope():
            model, history, epochs_trained, training_time = _fit(config, dataset, splits, extra_callbacks, replicas)
        if replicas > 1:
            # Evaluation, Grad-CAM and the logged model run on one device: a mirrored model cannot
            # predict a batch smaller than its replica count, and serving has one device anyway.
            model = _single_device_copy(model, config)

    images_path = dataset.path / "images.npy"
    metrics = _evaluate(model, images_path, splits["test"], cfg.batch_size, splits["train"].targets) \
        if evaluate_test else {}
    metrics.update(training_time_s=round(training_time, 2), epochs_trained=epochs_trained,
                   model_params=model.count_params())
    if evaluate_test:
        metrics["inference_ms_per_image"] = _inference_ms(model, images_path, splits["test"], cfg.batch_size)
    if cfg.monitor in history:
        metrics[f"best_{cfg.monitor}"] = best_value(history, cfg.monitor)
    mlflow.log_metrics({k: v for k, v in metrics.items() if not k.startswith("test_")})  # test_*: logged above
    log_figure(plots.training_curves(history, HEADS), "plots/training_curves.png")

    model_uri, decision = None, None
    if log_model:
        meta = {"arch": config.model.arch, "input_shape": [pre.img_size, pre.img_size, pre.channels],
                "preprocess": pre.to_dict(), "classes": {h: list(c) for h, c in HEAD_CLASSES.items()},
                "data_fingerprint": dataset.fingerprint,
                # the fallback of study-level prediction where no site can be seen (spinemri.study)
                "severity_prior": prior_from_samples(splits["train"].samples)}
        example = _request_example(splits["test"].samples, dataset.manifest.get("dataset_root", ""), pre)
        model_uri = log_classifier(model, meta, example, pip_requirements()).model_uri
        if config.mlflow.register and evaluate_test:
            decision = _register(config, model_uri, metrics, splits["test"].samples)
    return TrainResult(run_id="", metrics=metrics, model_uri=model_uri, epochs_trained=epochs_trained, history=history,
                       registered=decision)


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
    a plain machine, two in the tests). The previous policy comes back on exit.
    """
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    check_devices(cfg)
    mixed = cfg.mixed_precision == "on" or (cfg.mixed_precision == "auto" and bool(gpus))
    if cfg.strategy == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
    else:
        strategy = tf.distribute.get_strategy()  # the default: the one device TensorFlow picks
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    tags = {"strategy": cfg.strategy, "replicas": str(strategy.num_replicas_in_sync),
            "mixed_precision": "mixed_float16" if mixed else "off"}
    try:
        yield strategy, tags
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _single_device_copy(model: keras.Model, config: ExperimentConfig) -> keras.Model:
    """The same network with the same weights, built outside any distribution strategy."""
    pre = config.preprocessing
    copy = build_model(config.model.arch, pre.img_size, pre.channels, weights=config.model.weights,
                       dense_units=config.model.dense_units, dropout=config.model.dropout,
                       bn_momentum=config.model.bn_momentum)
    copy.set_weights(model.get_weights())
    return copy


def _fit(config: ExperimentConfig, dataset: cache.PreparedDataset, splits: dict[str, SplitData], extra_callbacks,
         replicas: int = 1):
    """Build, compile and fit (in the caller's strategy scope); returns the best weights' model."""
    cfg, pre = config.train, config.preprocessing
    model = build_model(config.model.arch, pre.img_size, pre.channels, weights=config.model.weights,
                        dense_units=config.model.dense_units, dropout=config.model.dropout,
                        bn_momentum=config.model.bn_momentum)
    images_path = dataset.path / "images.npy"
    train_ds = make_dataset(images_path, splits["train"], cfg.batch_size, shuffle=True, seed=cfg.seed,
                            augment=cfg.augment, severity_weights=config.model.severity_sample_weights,
                            min_batch=replicas)
    val_ds = make_dataset(images_path, splits["val"], cfg.batch_size, shuffle=False, seed=cfg.seed,
                          severity_weights=config.model.severity_sample_weights, min_batch=replicas)

    with tempfile.TemporaryDirectory() as tmp:
        best = Path(tmp) / "best.weights.h5"
        mode = "min" if "loss" in cfg.monitor else "max"  # Keras cannot tell for e.g. val_severity_loss
        callbacks = [
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.ModelCheckpoint(best, monitor=cfg.monitor, mode=mode, save_best_only=True,
                                            save_weights_only=True),
            keras.callbacks.EarlyStopping(monitor=cfg.monitor, mode=mode, patience=cfg.early_stopping_patience),
            keras.callbacks.ReduceLROnPlateau(monitor=cfg.monitor, mode=mode, factor=0.5,
                                              patience=cfg.reduce_lr_patience),
            MlflowEpochLogger(),
            *extra_callbacks,
        ]
        history: dict[str, list[float]] = {}
        started = time.perf_counter()
        stages = []
        if cfg.freeze_epochs > 0:
            stages.append((False, cfg.lr, 0, cfg.freeze_epochs))
        if cfg.epochs > cfg.freeze_epochs:
            lr = cfg.lr * cfg.fine_tune_lr_factor if cfg.freeze_epochs > 0 else cfg.lr
            stages.append((True, lr, cfg.freeze_epochs, cfg.epochs))
        for trainable, lr, first, last in stages:
            set_backbone_trainable(model, trainable)
            _compile(model, config, lr)
            fitted = model.fit(train_ds, validation_data=val_ds, epochs=last, initial_epoch=first,
                               callbacks=callbacks, verbose=2, shuffle=False)  # the dataset shuffles
            for key, values in fitted.history.items():
                history.setdefault(key, []).extend(float(v) for v in values)
            if model.stop_training or len(fitted.history.get("loss", [])) < last - first:
                break
        training_time = time.perf_counter() - started
        epochs_trained = len(history.get("loss", []))
        if any(not math.isfinite(v) for v in history.get("loss", [])):
            raise TrainingError(f"the training loss became NaN/inf after {epochs_trained} epoch(s) "
                                f"(lr={cfg.lr}); lower train.lr or check the data")
        if best.is_file():
            model.load_weights(best)
    return model, history, epochs_trained, training_time


def _request_example(samples: pd.DataFrame, root: str, pre) -> dict:
    """The logged input example: a de-identified crop of the first test sample (no DICOM tags)."""
    sample = samples.iloc[0].copy()
    sample["path"] = os.path.join(root, sample["path"])
    neighbours: list[str] = []
    if pre.channels == 3 and Path(sample["path"]).suffix.lower() == ".dcm":
        order = [p for _, p, _ in series_order(sorted(Path(sample["path"]).parent.glob("*.dcm")))]
        if sample["path"] in order:
            i = order.index(sample["path"])
            neighbours = [order[max(i - 1, 0)], order[min(i + 1, len(order) - 1)]]
    return example_row(sample, pre, neighbours)


def _register(config: ExperimentConfig, model_uri: str, metrics: dict[str, float], test: pd.DataFrame):
    metric = config.mlflow.champion_metric
    decision = registry.register(
        model_uri, config.mlflow.registered_model, metric=metric, value=metrics.get(metric),
        eval_set=registry.eval_set_hash(test),
        tags={"arch": config.model.arch, "experiment": config.name, "eval_set_samples": str(len(test)),
              "eval_set_studies": str(test["study_id"].nunique())},
    )
    mlflow.set_tags({"registered_model": decision.name, "registered_version": decision.version,
                     "registry_alias": decision.alias})
    print(decision, flush=True)
    return decision


def _inference_ms(model: keras.Model, images_path: Path, test: SplitData, batch_size: int) -> float:
    """Milliseconds per image of model.predict on up to 64 test images, after one warm-up batch."""
    batch = read_rows(str(images_path), test.rows[:64]).astype(np.float32)
    model.predict(batch[:batch_size], batch_size=batch_size, verbose=0)
    started = time.perf_counter()
    model.predict(batch, batch_size=batch_size, verbose=0)
    return round((time.perf_counter() - started) * 1000 / len(batch), 3)


def _compile(model: keras.Model, config: ExperimentConfig, lr: float) -> None:
    cfg = config.train
    if cfg.optimizer == "adam":
        optimizer = keras.optimizers.Adam(lr)
    elif cfg.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay or 0.004)
    else:
        optimizer = keras.optimizers.SGD(lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay or None)
    model.compile(
        optimizer=optimizer,
        loss={h: keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing) for h in HEADS},
        loss_weights={h: float(config.model.loss_weights[h]) for h in HEADS},
        weighted_metrics={h: ["accuracy"] for h in HEADS},
    )


def _evaluate(model: keras.Model, images_path: Path, test: SplitData, batch_size: int,
              train_targets: dict[str, np.ndarray]) -> dict[str, float]:
    """Predict the test split; log the figures and reports per head, the full evaluation
    (spinemri.evaluate: test_<head>_<metric> with bootstrap CIs over studies, baselines, calibration,
    breakdowns) and Grad-CAM heatmaps. Returns the point values of the test_<head>_<metric> metrics.
    """
    outputs = {h: [] for h in HEADS}
    for start in range(0, len(test), batch_size):  # one batch in memory at a time, whatever the split's size
        batch = read_rows(str(images_path), test.rows[start:start + batch_size]).astype(np.float32)
        predicted = model.predict_on_batch(batch)
        for h in HEADS:
            outputs[h].append(np.asarray(predicted[h]))
    proba = {h: np.concatenate(outputs[h]) for h in HEADS}
    for head in HEADS:
        classes = HEAD_CLASSES[head]
        y = test.targets[head]
        log_figure(plots.confusion(y, proba[head], classes, f"{head}: test confusion matrix"),
                   f"plots/confusion_{head}.png")
        log_figure(plots.roc_curves(y, proba[head], classes, f"{head}: test ROC (one-vs-rest)"),
                   f"plots/roc_{head}.png")
        mlflow.log_text(evaluation.report(y, proba[head], classes), f"reports/classification_report_{head}.txt")
    report = evaluate.evaluate_predictions(test.samples, test.targets, proba, train_targets=train_targets)
    evaluate.log_evaluation(report, "test")  # logs test_<head>_<metric> with its CI and baselines
    log_gradcam(model, _Rows(images_path, test.rows), test.targets, proba, head=list(HEADS))
    _log_sample_predictions(images_path, test, proba)
    return {f"test_{head}_{name}": float(entry["value"]) for head, result in report["heads"].items()
            for name, entry in result["metrics"].items() if entry["value"] is not None}


class _Rows:
    """Test images read on demand (Grad-CAM needs a few dozen of them, not the whole split in memory)."""

    def __init__(self, images_path: Path, rows: np.ndarray):
        self.images_path, self.rows = str(images_path), rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        return read_rows(self.images_path, self.rows[index])


def _log_sample_predictions(images_path: Path, test: SplitData, proba: dict[str, np.ndarray], count: int = 18) -> None:
    """The thesis's prediction figures: test images with true and predicted severity."""
    rng = np.random.default_rng(0)
    labelled = np.flatnonzero(test.targets["severity"] >= 0)
    chosen = np.sort(rng.choice(labelled, size=min(count, len(labelled)), replace=False))
    images = read_rows(str(images_path), test.rows[chosen])
    classes = HEAD_CLASSES["severity"]
    truths = [classes[test.targets["severity"][i]] for i in chosen]
    predictions = [classes[int(proba["severity"][i].argmax())] for i in chosen]
    probabilities = [float(proba["severity"][i].max()) for i in chosen]
    log_figure(plots.sample_predictions(images, truths, predictions, probabilities,
                                        "test samples: true vs predicted severity"), "plots/test_predictions.png")


__all__ = ["ConfigError", "TrainResult", "TrainingError", "distribution", "prepare_data", "train"]

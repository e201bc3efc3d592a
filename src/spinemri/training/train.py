"""train(config): data -> model -> compile -> fit -> evaluate -> log -> register, in one MLflow run.

The same function serves `spinemri train`, the MLproject `main` entry point and (logging into the
trial's run, with a pruning callback) every Optuna trial.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd

from spinemri.config import HEADS, ExperimentConfig
from spinemri.data import cache
from spinemri.data.dicom import series_order
from spinemri.data.schema import HEAD_CLASSES, SPLITS
from spinemri.data.source import prepare_data
from spinemri.errors import DatasetError
from spinemri.evaluation import heads, paired
from spinemri.evaluation.competition import prior_from_samples
from spinemri.evaluation.goals import best_value
from spinemri.evaluation.run import log_evaluation
from spinemri.models.backbones import get_backbone
from spinemri.models.gradcam import gradcam_grid
from spinemri.models.network import build_model, set_backbone_trainable
from spinemri.tracking.pyfunc import example_row, log_classifier
from spinemri.tracking.registry import eval_set_hash
from spinemri.tracking.runs import (TrainResult, log_figure, log_split, pip_requirements, register_and_tag, run_tags,
                                    training_run)
from spinemri.training import fit, plots
from spinemri.training.data import SplitData, make_dataset, read_rows, split_data
from spinemri.training.fit import best_weights, check_devices, check_finite, distribution, seed_everything


def train(config: ExperimentConfig, *, callbacks=(), nested: bool = False, log_model: bool = True,
          evaluate_test: bool = True, own_run: bool = True) -> TrainResult:
    """Train, evaluate on the test split and log everything to one MLflow run (see docs/training.md).

    ``own_run=False`` logs into the caller's active run and leaves its status to the caller
    (an Optuna trial); ``evaluate_test=False`` skips the test split (trials are chosen on
    validation, never on test).
    """
    config.validate()
    check_devices(config.train)
    get_backbone(config.model.arch).check_size(config.preprocess.img_size)
    dataset, samples = prepare_data(config)
    splits = {name: split_data(samples, name) for name in SPLITS}
    for name, part in splits.items():
        if not (part.targets["severity"] >= 0).any():
            raise DatasetError([f"{config.data.data_dir or 'the phantom'} has no labelled samples in the {name} "
                                f"split ({len(part)} samples); use more studies or other split.fractions"])
    seed_everything(config.train)
    # The search space stays in config.yaml; the task is a tag.
    params = {k: v for k, v in config.flat().items() if not k.startswith("tuning.search_space.") and k != "task"}
    params.update({f"split.{name}_samples": len(part) for name, part in splits.items()})
    params.update({f"split.{name}_studies": int(part.samples["study_id"].nunique()) for name, part in splits.items()})
    run_name = f"{config.model.arch}-{datetime.now():%Y%m%d-%H%M%S}" if own_run else None
    with training_run(experiment=config.mlflow.experiment, config=config.to_dict(redacted=True), params=params,
                      tags=run_tags(dataset.fingerprint, config.model.arch, config.task), run_name=run_name,
                      nested=nested, own_run=own_run) as run:
        log_split(dataset.splits(config.split.fractions, config.split.seed))
        result = _train_in_run(config, dataset, splits, callbacks, log_model, evaluate_test)
    result.run_id = run.info.run_id
    return result


def _train_in_run(config: ExperimentConfig, dataset: cache.PreparedDataset, splits: dict[str, SplitData],
                  extra_callbacks, log_model: bool, evaluate_test: bool) -> TrainResult:
    cfg, pre = config.train, config.preprocess
    with distribution(cfg) as (strategy, tags):
        mlflow.set_tags(tags)
        replicas = strategy.num_replicas_in_sync
        with strategy.scope():
            model, history, training_time = _fit(config, dataset, splits, extra_callbacks, replicas)
        if replicas > 1:
            # Evaluation, Grad-CAM and the logged model run on one device: a mirrored model cannot
            # predict a batch smaller than its replica count, and serving has one device anyway.
            model = _single_device_copy(model, config)

    images_path = dataset.path / "images.npy"
    epochs_trained = len(history.get("loss", []))
    metrics, predictions = _evaluate(model, images_path, splits["test"], cfg.batch_size, splits["train"].targets) \
        if evaluate_test else ({}, None)
    metrics.update(training_time_s=round(training_time, 2), epochs_trained=epochs_trained,
                   model_params=model.count_params())
    if evaluate_test:
        metrics["inference_ms_per_image"] = _inference_ms(model, images_path, splits["test"], cfg.batch_size)
    if cfg.monitor in history:
        metrics[f"best_{cfg.monitor}"] = best_value(history[cfg.monitor], cfg.monitor)
    mlflow.log_metrics({k: v for k, v in metrics.items() if not k.startswith("test_")})  # test_*: logged above
    log_figure(plots.training_curves(history, HEADS), "plots/training_curves.png")

    model_uri, decision = None, None
    if log_model:
        meta = {"arch": config.model.arch, "input_shape": [pre.img_size, pre.img_size, pre.channels],
                "preprocess": pre.to_dict(), "classes": {h: list(c) for h, c in HEAD_CLASSES.items()},
                "data_fingerprint": dataset.fingerprint,
                # the fallback of study-level prediction where no site can be seen (spinemri.study.predictor)
                "severity_prior": prior_from_samples(splits["train"].samples)}
        example = _request_example(splits["test"].samples, dataset.manifest.get("dataset_root", ""), pre)
        model_uri = log_classifier(model, meta, example, pip_requirements()).model_uri
        if config.mlflow.register and evaluate_test:
            test = splits["test"].samples
            metric = config.mlflow.champion_metric
            decision = register_and_tag(
                model_uri, config.mlflow.registered_model, metric=metric, value=metrics.get(metric),
                eval_set=eval_set_hash(test),
                tags={"arch": config.model.arch, "experiment": config.name, "eval_set_samples": str(len(test)),
                      "eval_set_studies": str(test["study_id"].nunique())},
                policy=config.mlflow.champion_policy, evidence=predictions)
    return TrainResult(run_id="", metrics=metrics, model_uri=model_uri, epochs_trained=epochs_trained, history=history,
                       registered=decision)


def _single_device_copy(model: keras.Model, config: ExperimentConfig) -> keras.Model:
    """The same network with the same weights, built outside any distribution strategy."""
    pre = config.preprocess
    copy = build_model(config.model.arch, pre.img_size, pre.channels, weights=config.model.weights,
                       dense_units=config.model.dense_units, dropout=config.model.dropout,
                       bn_momentum=config.model.bn_momentum)
    copy.set_weights(model.get_weights())
    return copy


def _fit(config: ExperimentConfig, dataset: cache.PreparedDataset, splits: dict[str, SplitData], extra_callbacks,
         replicas: int = 1):
    """Build, compile and fit (in the caller's strategy scope): the model with its best weights, the
    history, and the seconds it took. With ``train.freeze_epochs`` the backbone is first frozen."""
    cfg, pre = config.train, config.preprocess
    model = build_model(config.model.arch, pre.img_size, pre.channels, weights=config.model.weights,
                        dense_units=config.model.dense_units, dropout=config.model.dropout,
                        bn_momentum=config.model.bn_momentum)
    images_path = dataset.path / "images.npy"
    train_ds = make_dataset(images_path, splits["train"], cfg.batch_size, shuffle=True, seed=cfg.seed,
                            augment=cfg.augment, severity_weights=config.model.severity_sample_weights,
                            min_batch=replicas)
    val_ds = make_dataset(images_path, splits["val"], cfg.batch_size, shuffle=False, seed=cfg.seed,
                          severity_weights=config.model.severity_sample_weights, min_batch=replicas)
    stages = []
    if cfg.freeze_epochs > 0:
        stages.append((False, cfg.lr, 0, cfg.freeze_epochs))
    if cfg.epochs > cfg.freeze_epochs:
        lr = cfg.lr * cfg.fine_tune_lr_factor if cfg.freeze_epochs > 0 else cfg.lr
        stages.append((True, lr, cfg.freeze_epochs, cfg.epochs))
    history: dict[str, list[float]] = {}
    started = time.perf_counter()
    with best_weights(model) as best:
        stack = fit.callbacks(cfg, cfg.monitor, best, extra=extra_callbacks)
        for trainable, lr, first, last in stages:
            set_backbone_trainable(model, trainable)
            _compile(model, config, lr)
            fitted = model.fit(train_ds, validation_data=val_ds, epochs=last, initial_epoch=first,
                               callbacks=stack, verbose=2, shuffle=False)  # the dataset shuffles
            for key, values in fitted.history.items():
                history.setdefault(key, []).extend(float(v) for v in values)
            if model.stop_training or len(fitted.history.get("loss", [])) < last - first:
                break
        check_finite(history, "the classifier", cfg.lr)
    return model, history, time.perf_counter() - started


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
              train_targets: dict[str, np.ndarray]) -> tuple[dict[str, float], pd.DataFrame]:
    """Predict the test split; log the figures and reports per head, the full evaluation
    (spinemri.evaluation.heads: test_<head>_<metric> with bootstrap CIs over studies, baselines, calibration,
    breakdowns), Grad-CAM heatmaps and the per-row predictions (what a paired champion decision compares).
    Returns the point values of the test_<head>_<metric> metrics and the predictions.
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
        mlflow.log_text(heads.classification_text(y, proba[head], classes),
                        f"reports/classification_report_{head}.txt")
    evaluation = heads.evaluate_predictions(test.samples, test.targets, proba, train_targets=train_targets)
    log_evaluation(evaluation, "test")  # logs test_<head>_<metric> with its CI and baselines
    for head, figure in gradcam_grid(model, _Rows(images_path, test.rows), test.targets, proba,
                                     head=list(HEADS)).items():
        log_figure(figure, f"gradcam/{head}.png")
    _log_sample_predictions(images_path, test, proba)
    predictions = paired.prediction_table(test.samples, test.targets, proba)
    mlflow.log_text(predictions.to_csv(index=False), paired.PREDICTIONS_ARTIFACT)
    metrics = {f"test_{head}_{name}": float(entry["value"]) for head, result in evaluation["heads"].items()
               for name, entry in result["metrics"].items() if entry["value"] is not None}
    return metrics, predictions


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

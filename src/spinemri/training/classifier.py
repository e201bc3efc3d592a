"""A classifier's fit and what follows it, given the sections it reads (ClassifierSettings), whether for one
split (spinemri.api.classifier) or one fold of a cross-validation (spinemri.api.cv): fit under the
distribution strategy, predict a split, fit the calibration on held-out predictions, log a held-out
evaluation, log the servable model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import os
from pathlib import Path
import time

import keras
import mlflow
import numpy as np
import pandas as pd

from spinemri.config import HEADS, ClassifierSettings
from spinemri.data import cache
from spinemri.data.dicom import series_order
from spinemri.data.preprocess import stack_neighbours
from spinemri.data.schema import HEAD_CLASSES
from spinemri.errors import MetricError
from spinemri.metrics import competition, heads, operating, paired, plots
from spinemri.metrics import floor as floors
from spinemri.metrics.prior import pooled_prior, prior_from_samples, prior_grid
from spinemri.models import calibration
from spinemri.models.network import SiteCrossentropy, build_model, is_per_site, set_backbone_trainable, site_accuracy
from spinemri.models.severity import severity_at
from spinemri.serving.classifier import SpineClassifier, example_row, log_classifier
from spinemri.tracking.reports import log_competition_score, log_evaluation
from spinemri.tracking.runs import log_figure, pip_requirements
from spinemri.training import fit
from spinemri.training.cluster import average_statistics, distribute
from spinemri.training.data import SplitData, make_dataset, read_rows
from spinemri.training.fit import best_weights, check_finite, distribution
from spinemri.training.jitter import site_jitter


def fit_model(settings: ClassifierSettings, dataset: cache.PreparedDataset, splits: dict[str, SplitData],
              extra_callbacks=(), *, tracked: bool = True) -> tuple[keras.Model, dict[str, list[float]], float]:
    """Fit on ``splits["train"]``, watching ``splits["val"]``, under the configured distribution strategy
    (its tags and the epochs' metrics go to the active run; ``tracked=False``: to no run at all): the
    model with its best weights on one device, the history and the seconds it took."""
    with distribution(settings.train) as (strategy, tags):
        if tracked:
            mlflow.set_tags(tags)
        replicas = strategy.num_replicas_in_sync
        with strategy.scope():
            model, history, training_time = _fit(settings, dataset, splits, extra_callbacks, strategy, tracked)
            if settings.train.strategy == "multiworker":
                average_statistics(strategy, model)
        if replicas > 1:
            # Evaluation, Grad-CAM and the logged model run on one device: a mirrored model cannot
            # predict a batch smaller than its replica count, and serving has one device anyway.
            model = _single_device_copy(model, settings)
    return model, history, training_time


def _fit(settings: ClassifierSettings, dataset: cache.PreparedDataset, splits: dict[str, SplitData], extra_callbacks,
         strategy, tracked: bool):
    """Build, compile and fit (in ``strategy``'s scope): the model with its best weights, the
    history, and the seconds it took. With ``train.freeze_epochs`` the backbone is first frozen."""
    cfg, pre = settings.train, settings.preprocess
    model = _build(settings, severity_start(settings, splits["train"].samples))
    per_site = settings.severity_head == "per_site"
    images_path = dataset.path / "images.npy"
    jitter = site_jitter(settings.train, settings.preprocess)
    if jitter is not None and tracked:
        mlflow.log_params(jitter.params())
    per_sample = None if jitter is None else \
        jitter.per_sample(splits["train"].samples, pre.img_size / pre.roi_mm)
    replicas = strategy.num_replicas_in_sync
    train_ds = distribute(strategy, lambda part: make_dataset(
        images_path, splits["train"], cfg.batch_size, shuffle=True, seed=cfg.seed, augment=cfg.augment,
        severity_weights=settings.model.severity_sample_weights, min_batch=replicas, jitter=per_sample,
        replica_batches=part, per_site=per_site))
    val_ds = distribute(strategy, lambda part: make_dataset(
        images_path, splits["val"], cfg.batch_size, shuffle=False, seed=cfg.seed,
        severity_weights=settings.model.severity_sample_weights, min_batch=replicas, replica_batches=part,
        per_site=per_site))
    stages = []
    if cfg.freeze_epochs > 0:
        stages.append((False, cfg.lr, 0, cfg.freeze_epochs))
    if cfg.epochs > cfg.freeze_epochs:
        lr = cfg.lr * cfg.fine_tune_lr_factor if cfg.freeze_epochs > 0 else cfg.lr
        stages.append((True, lr, cfg.freeze_epochs, cfg.epochs))
    history: dict[str, list[float]] = {}
    started = time.perf_counter()
    with best_weights(model) as best:
        # The untrained model predicts the prior (its severity output starts there): where it watches a
        # severity metric, it is the first candidate for the best weights, so that training never ends below it.
        initial = _untrained_value(model, settings, val_ds, best, stages[0], tracked)
        stack = fit.callbacks(cfg, cfg.monitor, best, extra=extra_callbacks, tracked=tracked, initial=initial)
        for trainable, lr, first, last in stages:
            set_backbone_trainable(model, trainable)
            compile_model(model, settings, lr)
            fitted = model.fit(train_ds, validation_data=val_ds, epochs=last, initial_epoch=first,
                               callbacks=stack, verbose=0, shuffle=False)  # the dataset shuffles
            for key, values in fitted.history.items():
                history.setdefault(key, []).extend(float(v) for v in values)
            if model.stop_training or len(fitted.history.get("loss", [])) < last - first:
                break
        check_finite(history, "the classifier", cfg.lr)
    return model, history, time.perf_counter() - started


def _untrained_value(model: keras.Model, settings: ClassifierSettings, val_ds, best: Path, stage, tracked: bool
                     ) -> float | None:
    """With a severity monitor (``val_severity_loss``, ...): the monitor's value before training, with the
    untrained weights saved at ``best`` and the value logged as ``<monitor>_untrained``; else None."""
    monitor = settings.train.monitor
    if not monitor.startswith("val_severity_"):
        return None
    set_backbone_trainable(model, stage[0])
    compile_model(model, settings, stage[1])
    value = model.evaluate(val_ds, return_dict=True, verbose=0).get(monitor.removeprefix("val_"))
    if value is None or not np.isfinite(value):
        return None
    model.save_weights(best)
    if tracked:
        mlflow.log_metric(f"{monitor}_untrained", float(value))
    return float(value)


def severity_start(settings: ClassifierSettings, train_samples: pd.DataFrame) -> np.ndarray:
    """Where the severity output starts: the training rows' weight-aware prior, per site (25, 3) for a
    per-site output, pooled over every graded row (3,) for a single one."""
    if settings.severity_head == "per_site":
        return prior_grid(prior_from_samples(train_samples))
    return pooled_prior(train_samples)


def _build(settings: ClassifierSettings, severity_prior: np.ndarray | None = None) -> keras.Model:
    pre, m = settings.preprocess, settings.model
    return build_model(m.arch, pre.img_size, pre.channels, weights=m.weights, dense_units=m.dense_units,
                       dropout=m.dropout, bn_momentum=m.bn_momentum, slice_pooling=m.slice_pooling,
                       severity_head=settings.severity_head, severity_prior=severity_prior, pooling=m.pooling)


def compile_model(model: keras.Model, settings: ClassifierSettings, lr: float) -> None:
    cfg = settings.train
    if cfg.optimizer == "adam":
        optimizer = keras.optimizers.Adam(lr)
    elif cfg.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay or 0.004)
    else:
        optimizer = keras.optimizers.SGD(lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay or None)
    loss = {h: keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing) for h in HEADS}
    metrics = {h: ["accuracy"] for h in HEADS}
    if is_per_site(model):  # the loss and the accuracy at the row's site, named as for a single head
        loss["severity"] = SiteCrossentropy(label_smoothing=cfg.label_smoothing)
        metrics["severity"] = [keras.metrics.MeanMetricWrapper(site_accuracy, name="accuracy")]
    model.compile(
        optimizer=optimizer,
        loss=loss,
        loss_weights={h: float(settings.model.loss_weights[h]) for h in HEADS},
        weighted_metrics=metrics,
    )


def _single_device_copy(model: keras.Model, settings: ClassifierSettings) -> keras.Model:
    """The same network with the same weights, built outside any distribution strategy."""
    copy = _build(settings)
    copy.set_weights(model.get_weights())
    return copy


def predict_split(model: keras.Model, images_path: Path, split: SplitData, batch_size: int) -> dict[str, np.ndarray]:
    """The model's probabilities per head for every sample of ``split``, one batch in memory at a time; a
    per-site severity output is read at each row's site (:func:`~spinemri.models.network.severity_at`)."""
    outputs = {h: [] for h in HEADS}
    for start in range(0, len(split), batch_size):
        batch = read_rows(str(images_path), split.rows[start:start + batch_size]).astype(np.float32)
        predicted = model.predict_on_batch(batch)
        for h in HEADS:
            value = np.asarray(predicted[h])
            outputs[h].append(severity_at(value, split.sites[start:start + batch_size]) if h == "severity" else value)
    return {h: np.concatenate(outputs[h]) if outputs[h] else np.zeros((0, len(HEAD_CLASSES[h])))
            for h in HEADS}


def fit_calibration(model: keras.Model, settings: ClassifierSettings, images_path: Path, held_out: SplitData
                    ) -> calibration.Temperatures | None:
    """With ``model.calibration: temperature``, temperatures fitted on ``held_out`` (the validation split, never
    test) and logged as the table ``calibration/temperatures.json``; else None."""
    if settings.model.calibration != "temperature":
        return None
    proba = predict_split(model, images_path, held_out, settings.train.batch_size)
    temperatures = calibration.fit(held_out.targets, proba, held_out.samples["condition"].tolist(),
                                   severity_weights=settings.model.severity_sample_weights)
    mlflow.log_table(temperatures.table(), calibration.TABLE_ARTIFACT)
    return temperatures


def calibration_effect(targets: dict[str, np.ndarray], raw: dict[str, np.ndarray], split: str) -> dict[str, float]:
    """``<split>_severity_<loss|ece|weighted_log_loss>_uncalibrated``: the held-out severity numbers before
    temperature scaling, beside the calibrated ones the evaluation logs."""
    out = {}
    for head in ("severity",):
        keep = targets[head] >= 0
        if not keep.any():
            continue
        y, p = targets[head][keep], raw[head][keep]
        scores = heads.resample_scores(y, p, np.ones((1, len(y))), severity=head == "severity")
        for name in ("loss", "ece") + (("weighted_log_loss",) if head == "severity" else ()):
            if np.isfinite(scores[name][0]):
                out[f"{split}_{head}_{name}_uncalibrated"] = float(scores[name][0])
    return out


def log_held_out(samples: pd.DataFrame, targets: dict[str, np.ndarray], proba: dict[str, np.ndarray],
                 train_targets: dict[str, np.ndarray], split: str) -> dict:
    """Log the evaluation of held-out predictions (``split``: test, or cv for out-of-fold ones): per head a
    confusion matrix, ROC curves and a classification report, and the full evaluation
    (``<split>_<head>_<metric>`` with bootstrap CIs over studies, baselines, calibration). Returns the report."""
    suffix = "" if split == "test" else f"_{split}"
    for head in HEADS:
        classes = HEAD_CLASSES[head]
        y = targets[head]
        log_figure(plots.confusion(y, proba[head], classes, f"{head}: {split} confusion matrix"),
                   f"plots/confusion_{head}{suffix}.png")
        log_figure(plots.roc_curves(y, proba[head], classes, f"{head}: {split} ROC (one-vs-rest)"),
                   f"plots/roc_{head}{suffix}.png")
        mlflow.log_text(heads.classification_text(y, proba[head], classes),
                        f"reports/classification_report_{head}{suffix}.txt")
    evaluation = heads.evaluate_predictions(samples, targets, proba, train_targets=train_targets)
    log_evaluation(evaluation, split)
    return evaluation


def log_trained_model(model: keras.Model, settings: ClassifierSettings, dataset: cache.PreparedDataset,
                      splits: dict[str, SplitData], temperatures: calibration.Temperatures | None = None,
                      operating_points: dict[str, dict] | None = None) -> str:
    """Log ``model`` as the run's pyfunc with what serving needs (meta.json: preprocessing, classes, the
    prior, the temperatures, the referral thresholds); returns its URI."""
    pre = settings.preprocess
    meta = {"arch": settings.model.arch, "input_shape": [pre.img_size, pre.img_size, pre.channels],
            "severity_head": settings.severity_head,
            "preprocess": pre.to_dict(), "classes": {h: list(c) for h, c in HEAD_CLASSES.items()},
            "data_fingerprint": dataset.fingerprint,
            # the fallback of study-level prediction where no site can be seen (spinemri.serving.study_predictor)
            "severity_prior": prior_from_samples(splits["train"].samples)}
    if temperatures is not None:
        meta["temperature"] = temperatures.to_dict()
    if operating_points is not None:
        meta["operating_points"] = operating_points
    shown = splits.get("test") if splits.get("test") is not None and len(splits["test"]) else splits["val"]
    example = request_example(shown.samples, dataset.manifest.get("dataset_root", ""), pre)
    return log_classifier(model, meta, example, pip_requirements()).model_uri


def request_example(samples: pd.DataFrame, root: str, pre) -> dict:
    """The logged input example: a de-identified crop of the first test sample that names a site (no DICOM tags)."""
    sited = samples["condition"].notna() & samples["level"].notna()
    sample = samples[sited].iloc[0].copy() if sited.any() else samples.iloc[0].copy()
    sample["path"] = os.path.join(root, sample["path"])
    neighbours: list[str] = []
    if pre.slices > 1 and Path(sample["path"]).suffix.lower() == ".dcm":
        order = [p for _, p, _ in series_order(sorted(Path(sample["path"]).parent.glob("*.dcm")))]
        if sample["path"] in order:
            neighbours = [order[j] for j in stack_neighbours(order.index(sample["path"]), len(order), pre.slices)]
    return example_row(sample, pre, neighbours)


@dataclass(frozen=True)
class Graded:
    """Rows for the referral operating points: their samples (study_id, condition, level; ``fold`` out of
    fold), true severity index (-1: unlabelled), the model's calibrated severity probabilities and the floor's."""

    name: str
    samples: pd.DataFrame
    severity: np.ndarray
    proba: np.ndarray
    floor: np.ndarray

    @classmethod
    def of(cls, split: SplitData, proba: np.ndarray, train: SplitData) -> "Graded":
        """A split with the floor of ``train`` (the per-site prior of its rows)."""
        floor = floors.floor_predictions(split.samples, train.samples, train.targets)["severity"]
        return cls(split.name, split.samples, split.targets["severity"], proba, floor)


def log_operating_points(fit: Graded, held: Graded | None, targets: dict[str, float], split: str) -> dict[str, dict]:
    """Referral operating points (spinemri.metrics.operating): thresholds on the ``fit`` rows (validation or out
    of fold, never test) for ``targets``, the floor's fitted the same way, judged on ``held`` (None: on the
    ``fit`` rows themselves, cross-fitted over their folds); logged by :func:`log_point_rates`. Returns the
    thresholds."""
    points = operating.fit_thresholds(fit.samples, fit.severity, fit.proba, targets)
    floor_points = operating.fit_thresholds(fit.samples, fit.severity, fit.floor, targets)
    if held is None:
        held = fit
        table = operating.evaluate_cross_fitted(points, fit.samples, fit.severity, fit.proba, floor_points, fit.floor)
    else:
        table = operating.evaluate(points, held.samples, held.severity, held.proba, floor_points, held.floor)
    return log_point_rates(points, fit.name, table, held, split)


def log_point_rates(points: Mapping[str, operating.OperatingPoint], fitted_on: str, table: pd.DataFrame,
                    held: Graded, split: str) -> dict[str, dict]:
    """Log into the active run the thresholds ``points`` (chosen on the ``fitted_on`` rows) as
    :data:`operating.ARTIFACT` (what the model carries), the ``table`` of their rates on ``held``
    (:func:`operating.evaluate`) as ``evaluation/<split>_operating_points.json``, a figure per point and the
    metrics ``<split>_refer_any_<sensitivity|referral_rate>``. Returns the thresholds as JSON."""
    thresholds = {name: point.to_dict() for name, point in points.items()}
    mlflow.log_dict({"fitted_on": fitted_on, "points": thresholds}, operating.ARTIFACT)
    mlflow.log_table(table, f"evaluation/{split}_operating_points.json")
    for name, point in points.items():
        judged = operating.cases(name, held.samples, held.severity, held.proba)
        if len(judged):
            log_figure(plots.operating_point(name, judged["event"].to_numpy(), judged["score"].to_numpy(),
                                             point.threshold, point.target), f"clinical/{split}_{name}.png")
    anywhere = table[table["point"] == operating.ANY_LEVEL].set_index("rate")["value"]
    mlflow.log_metrics({f"{split}_refer_any_{rate}": float(anywhere[rate]) for rate in ("sensitivity", "referral_rate")
                        if np.isfinite(anywhere.get(rate, np.nan))})
    return thresholds


def log_floor(split: str, samples: pd.DataFrame, targets: dict[str, np.ndarray], proba: dict[str, np.ndarray],
              floor: dict[str, np.ndarray], metric: str) -> tuple[floors.Verdict | None, dict[str, float]]:
    """Judge held-out predictions against their floor (``floor``: :func:`spinemri.metrics.floor.floor_predictions`
    of the same rows) and log it into the active run: the floor's headline values ``<split>_floor_<metric>``
    (and ``<split>_floor_rsna_score``), its predictions ``evaluation/<split>_floor_predictions.csv``, the paired
    difference on the champion ``metric`` as ``<split>_vs_floor`` with its CI, and the verdict as tags.
    Returns the verdict (None, and a line saying why, where the metric cannot be computed on these rows) and
    the metrics logged."""
    values = {f"{split}_floor_{name}": v for name, v in floors.floor_metrics(targets, floor).items() if np.isfinite(v)}
    try:
        labels, submission = competition.site_predictions(samples, floor["severity"])
        values[f"{split}_floor_rsna_score"] = competition.rsna_score(labels, submission)
    except MetricError:  # a split without all three condition groups has no competition score
        pass
    mlflow.log_text(paired.prediction_table(samples, targets, floor).to_csv(index=False),
                    f"evaluation/{split}_floor_predictions.csv")
    try:
        verdict = floors.compare(metric, samples, targets, proba, floor, label=floors.held_out_name(metric, split))
    except MetricError as exc:
        mlflow.log_metrics(values)
        print(f"no verdict against {floors.FLOOR}: {exc}", flush=True)
        return None, values
    values.update(verdict.metrics(split))
    mlflow.log_metrics(values)
    mlflow.set_tags(verdict.tags())
    return verdict, values


def log_site_score(samples: pd.DataFrame, severity: np.ndarray, prior: pd.DataFrame | None, split: str
                   ) -> dict[str, float]:
    """The competition score of severity predictions at the labelled sites (stage 2 alone: the crops the
    classifier was given, not ones a localizer found) and its four terms, logged as ``<split>_rsna_score``
    (with its 95 % bootstrap CI over studies, ``_ci_low``/``_ci_high``) and ``<split>_rsna_<term>``. Every
    term's CI and (``prior``: a submission of the same rows) the prior's score and terms go to the table
    ``evaluation/<split>_rsna_score_table.json``, the per-study terms to
    ``evaluation/<split>_rsna_score.terms.csv`` (:func:`spinemri.api.evaluate.log_competition_score`)."""
    labels, submission = competition.site_predictions(samples, severity)
    try:
        return log_competition_score(labels, submission, prior, split)
    except MetricError as exc:  # e.g. a held-out split without a series type: no score, not a failed run
        print(f"no {split}_rsna_score: {exc}", flush=True)
        return {}


def predict_cached(classifier: SpineClassifier, images_path, part: SplitData, batch_size: int) -> dict[str, np.ndarray]:
    """A logged classifier's (calibrated) probabilities per head for the cached samples of ``part``, 256
    images in memory at a time."""
    outputs: dict[str, list[np.ndarray]] = {head: [] for head in HEAD_CLASSES}
    conditions, levels = part.samples["condition"].tolist(), part.samples["level"].tolist()
    for start in range(0, len(part), 256):
        predicted = classifier.predict_images(read_rows(str(images_path), part.rows[start:start + 256]),
                                              batch_size=batch_size, conditions=conditions[start:start + 256],
                                              levels=levels[start:start + 256], unsited="mean")
        for head in HEAD_CLASSES:
            outputs[head].append(predicted[head])
    return {head: np.concatenate(values) for head, values in outputs.items()}

"""train(config): data -> model -> fit -> calibrate -> evaluate -> log -> register, in one MLflow run.

The same function serves `spinemri train`, the MLproject `main` entry point and (logging into the
trial's run, with a pruning callback) every Optuna trial; with ``split.folds`` it cross-validates
instead (spinemri.api.cv). With ``train.strategy: multiworker`` every worker of the cluster runs
it and only the chief (worker 0) opens the run (spinemri.training.cluster).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
import time

import keras
import mlflow
import numpy as np
import pandas as pd

from spinemri.api.cv import cross_validate
from spinemri.api.source import prepare_data
from spinemri.config import HEADS, ExperimentConfig, run_params
from spinemri.data import cache
from spinemri.data.schema import HEAD_CLASSES, SPLITS
from spinemri.errors import ConfigError, DatasetError, TrainingError
from spinemri.metrics import floor as floors
from spinemri.metrics import paired, plots
from spinemri.metrics.goals import best_value
from spinemri.metrics.prior import prior_from_samples, prior_submission
from spinemri.models import calibration
from spinemri.models.backbones import get_backbone
from spinemri.models.gradcam import gradcam_grid
from spinemri.tracking import lineage
from spinemri.tracking.registry import eval_set_hash
from spinemri.tracking.runs import (
    TrainResult,
    describe_run,
    log_figure,
    log_headline,
    log_split,
    register_and_tag,
    run_tags,
    training_run,
)
from spinemri.training.cluster import Cluster, check_same_data, data_digest, join, read_cluster
from spinemri.training.data import SplitData, read_rows, split_data
from spinemri.training import fit
from spinemri.training.fit import check_devices, seed_everything, weights_digest
from spinemri.training.jitter import site_jitter
from spinemri.training.classifier import (Graded, calibration_effect, fit_calibration, fit_model, log_floor,
    log_held_out, log_operating_points, log_site_score, log_trained_model, predict_split)


def train(config: ExperimentConfig, *, callbacks=(), nested: bool = False, log_model: bool = True,
          evaluate_test: bool = True, own_run: bool = True) -> TrainResult:
    """Train, evaluate on the test split and log everything to one MLflow run (see docs/training.md).

    ``own_run=False`` logs into the caller's active run and leaves its status to the caller
    (an Optuna trial); ``evaluate_test=False`` skips the test split (trials are chosen on
    validation, never on test).
    """
    config.validate()
    if config.split.folds:
        if not own_run or nested:
            raise ConfigError(f"split.folds={config.split.folds}: cross-validation runs its own parent and fold "
                              "runs; tuning with folds is not available, set split.folds=0 to tune")
        return cross_validate(config, log_model=log_model)
    workers = strategy = None
    if config.train.strategy == "multiworker":  # TensorFlow allows it only before any other operation
        workers = read_cluster()
        strategy = join(workers, config.train.worker_timeout_s)
    check_devices(config.train)
    get_backbone(config.model.arch).check_size(config.preprocess.img_size)
    site_jitter(config.train, config.preprocess)  # a jitter that cannot apply fails here, before any run starts
    dataset, samples = prepare_data(config)
    splits = {name: split_data(samples, name) for name in SPLITS}
    for name, part in splits.items():
        if not (part.targets["severity"] >= 0).any():
            raise DatasetError([f"{config.data.data_dir or 'the phantom'} has no labelled samples in the {name} "
                                f"split ({len(part)} samples); use more studies or other split.fractions"])
    if workers is not None:
        check_same_data(strategy, workers, data_digest(dataset.content_digest, splits), config.train.worker_timeout_s)
    seed_everything(config.train)
    if workers is not None and not workers.is_chief:
        return _train_as_worker(config, dataset, splits, workers)
    # The search space stays in config.yaml; the task is a tag.
    params = {**run_params(config), "data_dir": dataset.manifest["data_dir"]}
    run_name = f"{config.model.arch}-{datetime.now():%Y%m%d-%H%M%S}" if own_run else None
    with training_run(experiment=config.mlflow.experiment, config=config.to_dict(redacted=True), params=params,
                      tags=run_tags(dataset.fingerprint, config.model.arch, config.task), run_name=run_name,
                      nested=nested, own_run=own_run) as run:
        log_split(dataset.splits(config.split.fractions, config.split.seed))
        lineage.log_splits(config.data, config.split, dataset.manifest["data_dir"], dataset.content_digest,
                           {name: part.samples for name, part in splits.items()})
        try:
            result = _train_in_run(config, dataset, splits, callbacks, log_model, evaluate_test)
        except TrainingError as exc:  # the run ends FAILED; say why on it
            mlflow.set_tag("fail_reason", str(exc))
            raise
    result.run_id = run.info.run_id
    return result


def _train_as_worker(config: ExperimentConfig, dataset: cache.PreparedDataset, splits: dict[str, SplitData],
                     workers: Cluster) -> TrainResult:
    """A multi-worker training on a worker other than the chief: the same fit, without any MLflow run
    and without evaluation (the chief logs, evaluates and registers the model). Prints the digest of
    its weights, which the chief's run records as the tag ``weights_sha256``."""
    model, history, _ = fit_model(config.classifier, dataset, splits, tracked=False)
    epochs = len(history.get("loss", []))
    print(f"worker {workers.index} ({workers.address}) finished {epochs} epoch(s) without a run of its own (the "
          f"chief, {workers.workers[0]}, logs it): weights_sha256 {weights_digest(model)}", flush=True)
    return TrainResult(run_id="", metrics={}, model_uri=None, epochs_trained=epochs, history=history)


def _train_in_run(config: ExperimentConfig, dataset: cache.PreparedDataset, splits: dict[str, SplitData],
                  extra_callbacks, log_model: bool, evaluate_test: bool) -> TrainResult:
    cfg = config.train
    model, history, training_time = fit_model(config.classifier, dataset, splits, extra_callbacks)
    mlflow.set_tag("weights_sha256", weights_digest(model))
    images_path = dataset.path / "images.npy"
    epochs_trained = len(history.get("loss", []))
    temperatures = fit_calibration(model, config.classifier, images_path, splits["val"])
    thresholds = None
    if evaluate_test:
        # the referral thresholds are chosen on the validation split, as the temperatures are
        val_proba = predict_split(model, images_path, splits["val"], cfg.batch_size)
        if temperatures is not None:
            val_proba = temperatures.apply(val_proba, splits["val"].samples["condition"].tolist())
        metrics, predictions, verdict, thresholds = _evaluate(
            model, images_path, splits["test"], cfg.batch_size, splits["train"], temperatures,
            explain=config.model.slice_pooling == "channels", metric=config.mlflow.champion_metric,
            referral=(Graded.of(splits["val"], val_proba["severity"], splits["train"]), config.clinical.targets()))
    else:
        metrics, predictions, verdict = {}, None, None
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
        fit.step("logging the model")
        model_uri = log_trained_model(model, config.classifier, dataset, splits, temperatures, thresholds)
        if config.mlflow.register and evaluate_test:
            test = splits["test"].samples
            metric = config.mlflow.champion_metric
            decision = register_and_tag(
                model_uri, config.mlflow.registered_model, metric=metric, value=metrics.get(metric),
                eval_set=eval_set_hash(test),
                tags={"arch": config.model.arch, "experiment": config.name, "eval_set_samples": str(len(test)),
                      "eval_set_studies": str(test["study_id"].nunique())},
                policy=config.mlflow.champion_policy, evidence=predictions, verdict=verdict,
                allow_below_floor=config.mlflow.allow_below_floor)
    if evaluate_test:
        describe_run(verdict, str(decision) if decision else "")
        log_headline(metrics, config.mlflow.champion_metric)
    return TrainResult(run_id="", metrics=metrics, model_uri=model_uri, epochs_trained=epochs_trained, history=history,
                       registered=decision, verdict=verdict)


def _inference_ms(model: keras.Model, images_path: Path, test: SplitData, batch_size: int) -> float:
    """Milliseconds per image of model.predict on up to 64 test images, after one warm-up batch."""
    batch = read_rows(str(images_path), test.rows[:64]).astype(np.float32)
    model.predict(batch[:batch_size], batch_size=batch_size, verbose=0)
    started = time.perf_counter()
    model.predict(batch, batch_size=batch_size, verbose=0)
    return round((time.perf_counter() - started) * 1000 / len(batch), 3)


def _evaluate(model: keras.Model, images_path: Path, test: SplitData, batch_size: int, train: SplitData,
              temperatures: calibration.Temperatures | None = None, explain: bool = True,
              metric: str = "test_severity_weighted_log_loss",
              referral: tuple[Graded, dict[str, float]] | None = None
              ) -> tuple[dict[str, float], pd.DataFrame, floors.Verdict | None, dict | None]:
    """Predict the test split; log the figures and reports per head, the full evaluation
    (spinemri.metrics.heads: test_<head>_<metric> with bootstrap CIs over studies, baselines, calibration,
    breakdowns), Grad-CAM heatmaps, the per-row predictions (what a paired champion decision compares) and
    the comparison with the floor on ``metric`` (the per-site prior of the training rows, :func:`log_floor`).
    ``referral``: the rows the referral thresholds are chosen on (validation, with their calibrated severity
    probabilities and the floor's) and the target sensitivities (:func:`log_operating_points`). Returns the point values of the
    test_<head>_<metric> metrics, the predictions, the verdict and the thresholds (None without ``referral``).
    """
    fit.step(f"evaluating on the test split: {len(test)} samples of {test.samples['study_id'].nunique()} studies, "
             "with bootstrap CIs and the floor")
    proba = predict_split(model, images_path, test, batch_size)
    if temperatures is not None:  # what the logged model serves
        mlflow.log_metrics(calibration_effect(test.targets, proba, "test"))
        proba = temperatures.apply(proba, test.samples["condition"].tolist())
    evaluation = log_held_out(test.samples, test.targets, proba, train.targets, "test")
    if explain:  # Grad-CAM explains one backbone over the slices as channels, not a per-slice encoder
        fit.step("Grad-CAM heatmaps of the test images")
        for head, figure in gradcam_grid(model, _Rows(images_path, test.rows), test.targets, proba,
                                         head=list(HEADS), sites=test.sites).items():
            log_figure(figure, f"gradcam/{head}.png")
    _log_sample_predictions(images_path, test, proba)
    predictions = paired.prediction_table(test.samples, test.targets, proba)
    mlflow.log_text(predictions.to_csv(index=False), paired.PREDICTIONS_ARTIFACT)
    metrics = {f"test_{head}_{name}": float(entry["value"]) for head, result in evaluation["heads"].items()
               for name, entry in result["metrics"].items() if entry["value"] is not None}
    prior = prior_submission(sorted(test.samples["study_id"].astype(str).unique()), prior_from_samples(train.samples))
    metrics.update(log_site_score(test.samples, proba["severity"], prior, "test"))
    floor = floors.floor_predictions(test.samples, train.samples, train.targets)
    verdict, values = log_floor("test", test.samples, test.targets, proba, floor, metric)
    metrics.update(values)
    thresholds = None
    if referral is not None:
        fitted_on, targets = referral
        thresholds = log_operating_points(fitted_on, Graded(test.name, test.samples, test.targets["severity"],
                                                            proba["severity"], floor["severity"]), targets, "test")
    return metrics, predictions, verdict, thresholds


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

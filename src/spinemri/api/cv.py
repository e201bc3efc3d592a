"""K-fold cross-validation by study: ``spinemri train --folds K`` (``split.folds``, ``-P folds=K``).

The studies outside the locked test split — the studies every single-split run holds out
(:func:`spinemri.data.splits.fold_studies`) — are dealt into K folds stratified by their worst grade.
Fold k's model trains on the other folds and is validated on fold k (early stopping, learning-rate
schedule and best epoch watch it, as in the RSNA 2024 solutions); its predictions of fold k are
that fold's out-of-fold (OOF) predictions. Every CV study is predicted once, by the one model that
never trained on it; the locked test split is never predicted, so no choice made on CV numbers
has seen it.

One parent run (tag ``role=cv``) records ``data/folds.csv``, ``evaluation/oof_predictions.csv``
(every CV sample with its fold and probabilities per head), the OOF evaluation ``cv_<head>_<metric>``
with bootstrap CIs over all CV studies (spinemri.metrics.heads), and the study-level
competition score of the OOF severity predictions at the labelled sites, ``cv_rsna_score`` (with
``_ci_low``/``_ci_high``) and its four terms ``cv_rsna_<term>`` (their CIs and the weight-aware prior's
score in ``evaluation/cv_rsna_score_table.json``); its per-study terms (``evaluation/cv_rsna_score.terms.csv``) are what a
paired comparison of two CV runs resamples. One nested run per fold (``role=fold``, ``fold=k``)
records the fold's split, curves, model and ``fold_<head>_<metric>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import mlflow
import numpy as np
import pandas as pd

from spinemri.api.source import prepare_data
from spinemri.config import HEADS, ExperimentConfig, run_params
from spinemri.data import cache
from spinemri.data.splits import fold_studies
from spinemri.errors import DatasetError
from spinemri.metrics import competition, heads, paired, plots, prior
from spinemri.metrics import floor as floors
from spinemri.metrics.goals import best_value
from spinemri.models import calibration
from spinemri.models.backbones import get_backbone
from spinemri.tracking import lineage
from spinemri.tracking.runs import (
    CV_ROLE,
    CV_SCORE,
    FOLD_ROLE,
    TrainResult,
    describe_run,
    log_figure,
    log_headline,
    log_split,
    run_tags,
    training_run,
)
from spinemri.training.data import SplitData, encode_targets, split_data
from spinemri.training.fit import check_devices, seed_everything
from spinemri.training.jitter import site_jitter
from spinemri.training.classifier import (Graded, calibration_effect, fit_model, log_floor, log_held_out,
    log_operating_points, log_site_score, log_trained_model, predict_split)

OOF_ARTIFACT = "evaluation/oof_predictions.csv"
FOLDS_ARTIFACT = "data/folds.csv"
FOLD_MODELS_ARTIFACT = "cv/fold_models.json"  # what `spinemri ensemble` packages


@dataclass
class FoldResult:
    fold: int
    run_id: str
    samples: pd.DataFrame  # the held-out fold's samples
    proba: dict[str, np.ndarray]
    train_samples: pd.DataFrame
    model_uri: str | None
    epochs_trained: int
    training_time: float
    floor: dict[str, np.ndarray] | None = None  # the per-site prior of the fold's training rows, on its held rows


def cross_validate(config: ExperimentConfig, *, log_model: bool = True, folds_table: pd.DataFrame | None = None,
                   nested: bool = False) -> TrainResult:
    """Train one model per fold in nested runs of one parent run and log the out-of-fold evaluation.

    ``folds_table`` (study_id, split, fold; as :func:`fold_studies` returns) imposes the folds, e.g. those
    of the localizers of the same pipeline; ``nested`` opens the parent run inside the active run.
    """
    config.validate()
    folds = config.split.folds
    if folds < 2:
        raise ValueError("cross_validate needs split.folds >= 2")
    check_devices(config.train)
    get_backbone(config.model.arch).check_size(config.preprocess.img_size)
    jitter = site_jitter(config.train, config.preprocess)  # one that cannot apply fails here, before any run
    dataset, samples = prepare_data(config)
    table = folds_table if folds_table is not None else fold_studies(
        samples, folds, test_fraction=config.split.fractions[2], seed=config.split.seed)
    fold_of = dict(zip(table["study_id"].astype(str), table["fold"].astype(int)))
    fold = samples["study_id"].astype(str).map(fold_of)
    if fold.isna().any():
        raise DatasetError([f"the folds do not assign study {samples.loc[fold.isna(), 'study_id'].iloc[0]} "
                            f"({int(samples.loc[fold.isna(), 'study_id'].nunique())} studies unassigned)"])
    samples = samples.assign(fold=fold.astype(int).to_numpy(), split=np.where(fold < 0, "test", "cv"))
    for k in range(folds):
        held = samples[samples["fold"] == k]
        if not (held["severity"].notna()).any():
            raise DatasetError([f"fold {k} of {folds} has no graded sample ({held['study_id'].nunique()} studies); "
                                "use more studies or fewer folds"])
    seed_everything(config.train)
    params = {**run_params(config), "data_dir": dataset.manifest["data_dir"]}
    params.update(jitter.params() if jitter else {})  # each fold's run logs them too
    tags = {**run_tags(dataset.fingerprint, config.model.arch, config.task), "role": CV_ROLE, "folds": str(folds)}
    with training_run(experiment=config.mlflow.experiment, config=config.to_dict(redacted=True), params=params,
                      tags=tags, run_name=f"{config.model.arch}-cv{folds}-{datetime.now():%Y%m%d-%H%M%S}",
                      nested=nested) as run:
        mlflow.log_text(table.to_csv(index=False), FOLDS_ARTIFACT)
        lineage.log_splits(config.data, config.split, dataset.manifest["data_dir"], dataset.content_digest,
                           {"cv": samples[samples["fold"] >= 0], "test": samples[samples["fold"] < 0]})
        results = [_fold(config, dataset, samples, k, log_model) for k in range(folds)]
        if log_model:
            mlflow.log_dict({"folds": [{"fold": r.fold, "run_id": r.run_id, "model_uri": r.model_uri}
                                       for r in results]}, FOLD_MODELS_ARTIFACT)
        metrics, verdict = log_out_of_fold(results, config)
        metrics.update(epochs_trained=float(np.mean([r.epochs_trained for r in results])),
                       training_time_s=round(sum(r.training_time for r in results), 2))
        mlflow.log_metrics({"epochs_trained": metrics["epochs_trained"], "training_time_s": metrics["training_time_s"]})
    score = (f"{CV_SCORE} {metrics[CV_SCORE]:.4f} [{metrics[CV_SCORE + '_ci_low']:.4f}, "
             f"{metrics[CV_SCORE + '_ci_high']:.4f}]") if CV_SCORE in metrics else f"no {CV_SCORE}"
    print(f"cross-validation run {run.info.run_id}: {folds} folds, {score} over {int(metrics['cv_n_studies'])} "
          "studies; fold models are not registered (`spinemri ensemble` packages them)", flush=True)
    return TrainResult(run_id=run.info.run_id, metrics=metrics, model_uri=None,
                       epochs_trained=int(round(metrics["epochs_trained"])), verdict=verdict)


def _fold(config: ExperimentConfig, dataset: cache.PreparedDataset, samples: pd.DataFrame, k: int,
          log_model: bool) -> FoldResult:
    split = np.where(samples["fold"] == k, "val", np.where(samples["fold"] < 0, "test", "train"))
    fold_samples = samples.assign(split=split)
    splits: dict[str, SplitData] = {name: split_data(fold_samples, name) for name in ("train", "val")}
    tags = {**run_tags(dataset.fingerprint, config.model.arch, config.task), "role": FOLD_ROLE, "fold": str(k)}
    print(f"== fold {k + 1}/{config.split.folds}: {splits['train'].samples['study_id'].nunique()} studies train, "
          f"{splits['val'].samples['study_id'].nunique()} held out ==", flush=True)
    # The settings are the parent's params; a fold run records its data.
    with training_run(experiment=config.mlflow.experiment, config=config.to_dict(redacted=True), params={},
                      tags=tags, run_name=f"fold-{k}", nested=True) as run:
        log_split(fold_samples[["study_id", "split"]].drop_duplicates().sort_values("study_id"))
        lineage.log_splits(config.data, config.split, dataset.manifest["data_dir"], dataset.content_digest,
                           {name: part.samples for name, part in splits.items()})
        model, history, seconds = fit_model(config.classifier, dataset, splits)
        held = splits["val"]
        proba = predict_split(model, dataset.path / "images.npy", held, config.train.batch_size)
        metrics = {f"fold_{head}_{name}": value for head in HEADS
                   for name, value in heads.head_metrics(held.targets[head], proba[head]).items()
                   if np.isfinite(value)}
        metrics.update(training_time_s=round(seconds, 2), epochs_trained=len(history.get("loss", [])))
        if config.train.monitor in history:
            metrics[f"best_{config.train.monitor}"] = best_value(history[config.train.monitor], config.train.monitor)
        mlflow.log_metrics(metrics)
        log_figure(plots.training_curves(history, HEADS), "plots/training_curves.png")
        mlflow.log_text(paired.prediction_table(held.samples, held.targets, proba).to_csv(index=False),
                        "evaluation/fold_predictions.csv")
        floor = floors.floor_predictions(held.samples, splits["train"].samples, splits["train"].targets)
        verdict, values = log_floor("fold", held.samples, held.targets, proba, floor, config.mlflow.champion_metric)
        metrics.update(values)
        describe_run(verdict, f"Fold {k + 1} of {config.split.folds}: trained on the other folds, evaluated on "
                              "this fold's studies (which also chose its best epoch).")
        log_headline(metrics, floors.held_out_name(config.mlflow.champion_metric, "fold"))
        if verdict is not None:
            print(f"fold {k + 1}/{config.split.folds}: {verdict.sentence}", flush=True)
        temperatures = None
        if config.model.calibration == "temperature":  # the fold model's own, fitted on its validation fold
            temperatures = calibration.fit(held.targets, proba, held.samples["condition"].tolist(),
                                           severity_weights=config.model.severity_sample_weights)
            mlflow.log_table(temperatures.table(), calibration.TABLE_ARTIFACT)
        model_uri = log_trained_model(model, config.classifier, dataset, splits, temperatures) if log_model else None
    return FoldResult(fold=k, run_id=run.info.run_id, samples=held.samples, proba=proba,
                      train_samples=splits["train"].samples, model_uri=model_uri,
                      epochs_trained=int(metrics["epochs_trained"]), training_time=seconds,
                      floor=floor)


def log_out_of_fold(results: list[FoldResult], config: ExperimentConfig
                    ) -> tuple[dict[str, float], floors.Verdict | None]:
    """Log the OOF evaluation of ``results`` into the active (parent) run, with its verdict against the floor
    (each fold's rows against the per-site prior of that fold's training rows); returns its headline values
    and the verdict.

    With ``model.calibration: temperature`` the OOF predictions are calibrated *cross-fitted*
    (:func:`spinemri.models.calibration.cross_fitted`), so no prediction is scaled by a temperature fitted on itself;
    ``cv_<head>_<loss|ece>_uncalibrated`` keep the numbers before.
    """
    samples = pd.concat([r.samples.assign(fold=r.fold) for r in results], ignore_index=True)
    proba = {h: np.concatenate([r.proba[h] for r in results]) for h in HEADS}
    duplicated = samples.duplicated(subset=["index"])
    if duplicated.any():  # each sample belongs to one fold; anything else is a bug, not a user error
        raise AssertionError(f"{int(duplicated.sum())} samples predicted by more than one fold")
    targets = encode_targets(samples)
    before = {}
    if config.model.calibration == "temperature":
        before = calibration_effect(targets, proba, "cv")
        labels, submission = competition.site_predictions(samples, proba["severity"])
        before[f"{CV_SCORE}_uncalibrated"] = competition.rsna_score(labels, submission)
        mlflow.log_metrics(before)
        proba = calibration.cross_fitted(targets, proba, samples["condition"].tolist(), samples["study_id"].tolist(),
                                         samples["fold"].to_numpy(),
                                         severity_weights=config.model.severity_sample_weights)
    # Baselines from each fold's own training folds would differ per fold; the CV studies' labels are one
    # distribution, known to every fold model up to one fold.
    evaluation = log_held_out(samples, targets, proba, targets, "cv")
    table = paired.prediction_table(samples, targets, proba).assign(fold=samples["fold"].to_numpy())
    mlflow.log_text(table.to_csv(index=False), OOF_ARTIFACT)
    metrics = {f"cv_{head}_{name}": float(entry["value"]) for head, result in evaluation["heads"].items()
               for name, entry in result.get("metrics", {}).items() if entry["value"] is not None}
    metrics["cv_n_studies"] = float(evaluation["n_studies"])
    metrics.update(log_site_score(samples, proba["severity"], _fold_priors(results), "cv"))
    floor = {h: np.concatenate([r.floor[h] for r in results]) for h in HEADS}  # each fold's own prior
    verdict, values = log_floor("cv", samples, targets, proba, floor, config.mlflow.champion_metric)
    metrics.update(values)
    # referral thresholds fitted on every out-of-fold row; a study's rates by the threshold of its fold's other studies
    log_operating_points(Graded("out-of-fold", samples, targets["severity"], proba["severity"], floor["severity"]),
                         None, config.clinical.targets(), "cv")
    describe_run(verdict, f"Out of fold: {len(results)} fold models, each evaluated on the studies it never trained "
                          "on, against the per-site prior of its own training folds.")
    log_headline(metrics, floors.held_out_name(config.mlflow.champion_metric, "cv"))
    return {**metrics, **before}, verdict


def _fold_priors(results: list[FoldResult]) -> pd.DataFrame:
    """The weight-aware prior of each fold's training labels, as a submission of that fold's studies."""
    parts = [prior.prior_submission(sorted(r.samples["study_id"].astype(str).unique()),
                                          prior.prior_from_samples(r.train_samples)) for r in results]
    return pd.concat(parts, ignore_index=True)


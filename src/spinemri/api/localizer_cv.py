"""K-fold cross-validation of a localizer: ``spinemri train --task localize --series S --folds K``.

The folds are the classifier's (:func:`spinemri.data.splits.fold_studies`: same label table, seed and
locked test fraction), so a study is held out of the localizer and the classifier of the same fold,
and a pipeline cross-validated stage by stage has out-of-fold *predicted* sites for every study.
Fold k's localizer trains on the other folds, watches fold k (best checkpoint, early stopping) and
measures it. One parent run (``role=cv``, ``folds``, ``localize.series``) records:

- ``data/folds.csv`` and ``cv/fold_models.json`` (each fold's run and model);
- ``localize/oof_errors.csv``: one row per labelled point of every CV study, with its fold;
- ``cv_<s>_point_error_mm`` (with a 95 % bootstrap CI over studies), ``_median``, ``cv_<s>_within_5mm``,
  ``_within_10mm``, ``cv_<s>_slice_accuracy`` and ``cv_<s>_slice_exact``: what site jitter reads
  (``train.site_jitter_from: runs:/<this run>``).

Each fold's nested run (``role=fold``, ``fold=k``) logs ``fold_<s>_...`` beside the mean-position
baseline's ``fold_<s>_baseline_...``, and its model (not registered).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
import math

import mlflow
import pandas as pd

from spinemri.api.cv import FOLD_MODELS_ARTIFACT, FOLDS_ARTIFACT
from spinemri.api.localizer import experiment_name, localizer_samples, make_splits, train_in_run
from spinemri.config import ExperimentConfig, run_params
from spinemri.data.splits import fold_studies
from spinemri.errors import DatasetError
from spinemri.localization.locate import error_terms, summarize_errors
from spinemri.localization.sites import get_task
from spinemri.metrics.paired import score_intervals, terms_artifact
from spinemri.tracking import lineage
from spinemri.tracking.runs import CV_ROLE, FOLD_ROLE, log_headline, log_split, run_tags, training_run
from spinemri.training.fit import seed_everything

OOF_ERRORS_ARTIFACT = "localize/oof_errors.csv"


@dataclass
class LocalizerCV:
    run_id: str
    series: str
    metrics: dict[str, float]
    fold_models: dict[int, str]  # fold -> logged model URI


def cross_validate_localizer(config: ExperimentConfig, *, folds_table: pd.DataFrame | None = None,
                             nested: bool = False) -> LocalizerCV:
    """One localizer per fold in nested runs of one parent run, and the out-of-fold point errors.

    ``folds_table`` (study_id, fold; -1 = locked test) imposes the folds; by default they are drawn
    from the labels as the classifier's cross-validation draws them.
    """
    config.validate()
    folds = config.split.folds
    if folds < 2:
        raise ValueError("cross_validate_localizer needs split.folds >= 2")
    task = get_task(config.localize.series)
    dataset, samples = localizer_samples(config)
    table = folds_table if folds_table is not None else fold_studies(
        samples, folds, test_fraction=config.split.fractions[2], seed=config.split.seed)
    fold_of = {str(s): int(f) for s, f in zip(table["study_id"], table["fold"])}
    fold_splits = []  # every fold's splits first: a fold without a labelled series fails before any training
    for k in range(folds):
        split_of = {s: "val" if f == k else "train" if f >= 0 else "test" for s, f in fold_of.items()}
        try:
            fold_splits.append((split_of, make_splits(config, dataset, samples, split_of, ("train", "val"))))
        except DatasetError as exc:
            raise DatasetError([f"fold {k} of {folds} ('val' = the held-out fold): {problem}; or use fewer folds"
                                for problem in exc.problems]) from None
    seed_everything(config.train)
    params = {**run_params(config), "data_dir": dataset.manifest["data_dir"]}
    tags = {**run_tags(dataset.fingerprint, config.model.arch, "localize"), "localize.series": task.name,
            "role": CV_ROLE, "folds": str(folds)}
    with training_run(experiment=experiment_name(config), config=config.to_dict(redacted=True), params=params,
                      tags=tags, nested=nested,
                      run_name=f"localize-{task.name}-{config.model.arch}-cv{folds}-{datetime.now():%Y%m%d-%H%M%S}") as run:
        mlflow.log_text(table.to_csv(index=False), FOLDS_ARTIFACT)
        slices = dataset.slices()
        fold = slices["study_id"].astype(str).map(fold_of)
        lineage.log_splits(config.data, config.split, dataset.manifest["data_dir"], dataset.content_digest,
                           {"cv": slices[fold >= 0], "test": slices[fold < 0]}, unit="slices")
        errors, models = [], {}
        for k, (split_of, splits) in enumerate(fold_splits):
            print(f"== {task.name} localizer, fold {k + 1}/{folds}: {splits['train'].slices['study_id'].nunique()} "
                  f"studies train, {splits['val'].slices['study_id'].nunique()} held out ==", flush=True)
            fold_tags = {**tags, "role": FOLD_ROLE, "fold": str(k)}
            fold_tags.pop("folds")
            with training_run(experiment=experiment_name(config), config=config.to_dict(redacted=True),
                              params={}, tags=fold_tags, run_name=f"{task.name}-fold-{k}", nested=True) as fold_run:
                lineage.log_splits(config.data, config.split, dataset.manifest["data_dir"], dataset.content_digest,
                                   {n: s.slices for n, s in splits.items()}, unit="slices")
                log_split(pd.DataFrame([(s, n) for s, n in sorted(split_of.items()) if n in splits],
                                       columns=["study_id", "split"]))
                result, held = train_in_run(config, task, dataset, splits, held="val", prefix="fold", register=False)
            errors.append(held.assign(fold=k))
            models[k] = result.model_uri
            print(f"   fold {k}: run {fold_run.info.run_id}, point error "
                  f"{result.metrics.get(f'fold_{task.name}_point_error_mm', math.nan):.2f} mm", flush=True)
        oof = pd.concat(errors, ignore_index=True)
        if oof.groupby("study_id")["fold"].nunique().gt(1).any():  # a bug, not a user error
            raise AssertionError("a study was held out by more than one fold")
        metrics = log_out_of_fold(task.name, oof)
        log_headline(metrics)
        mlflow.log_dict({"folds": [{"fold": k, "model_uri": uri} for k, uri in models.items()]}, FOLD_MODELS_ARTIFACT)
    print(f"localizer cross-validation run {run.info.run_id}: {task.name}, {folds} folds, point error "
          f"{metrics[f'cv_{task.name}_point_error_mm']:.2f} mm over {oof['study_id'].nunique()} studies", flush=True)
    return LocalizerCV(run.info.run_id, task.name, metrics, models)


def log_out_of_fold(series: str, oof: pd.DataFrame) -> dict[str, float]:
    """Log the OOF point errors of one series type into the active run; returns the metrics."""
    metrics = {f"cv_{series}_{k}": v for k, v in summarize_errors(oof).items() if math.isfinite(v)}
    metric = f"cv_{series}_point_error_mm"
    terms = error_terms(oof)
    mlflow.log_text(terms.to_csv(index=False), terms_artifact(metric))
    if terms["point_error_mm:weight"].sum() > 0:
        _, low, high = score_intervals(terms)["point_error_mm"]
        metrics.update({f"{metric}_ci_low": low, f"{metric}_ci_high": high})
    metrics["cv_n_studies"] = float(oof["study_id"].nunique())
    mlflow.log_metrics(metrics)
    mlflow.log_text(oof.to_csv(index=False), OOF_ERRORS_ARTIFACT)
    return metrics

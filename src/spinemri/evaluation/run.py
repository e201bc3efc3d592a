"""Evaluate the model a training run logged, and log an evaluation report into a run.

:func:`log_evaluation` writes a report (spinemri.evaluation.heads) into the active run as metrics,
JSON, Markdown and figures; :func:`evaluate_run` rebuilds a finished run's data from its own
config.yaml, predicts one of its splits with the logged model and logs the report into that run.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

from spinemri.config import ExperimentConfig, from_dict
from spinemri.data.schema import HEAD_CLASSES, SPLITS
from spinemri.data.source import prepare_data
from spinemri.errors import ConfigError, DatasetError, EvaluationError, ImageReadError, PrepareError
from spinemri.evaluation import competition, paired
from spinemri.evaluation.heads import evaluate_predictions
from spinemri.evaluation.report import (breakdown_figure, evaluation_markdown, evaluation_metrics, evaluation_table,
                                        reliability_figure)
from spinemri.tracking.pyfunc import SpineClassifier, load_classifier
from spinemri.tracking.runs import PROCESS_TAG, RESUMED_FROM_TAG, log_figure, logged_table, start_run
from spinemri.training.data import SplitData, read_rows, split_data


def log_evaluation(report: Mapping[str, Any], split: str) -> None:
    """Log a report into the active run: the headline :func:`evaluation_metrics`, every number as the MLflow
    table ``evaluation/<split>_table.json`` (:func:`evaluation_table`), ``evaluation/<split>.json``,
    ``evaluation/<split>.md``, ``evaluation/<split>_reliability_<head>.png`` and
    ``evaluation/<split>_breakdown_severity.png``."""
    if mlflow.active_run() is None:
        raise RuntimeError("log_evaluation needs an active MLflow run")
    if not re.fullmatch(r"[a-z0-9_]+", split):
        raise ValueError(f"split must be a plain name such as test, got {split!r}")
    mlflow.log_metrics(evaluation_metrics(report, split))
    mlflow.log_table(evaluation_table(report), table_artifact(split))
    mlflow.log_dict(dict(report), f"evaluation/{split}.json")
    mlflow.log_text(evaluation_markdown(report, split), f"evaluation/{split}.md")
    for head, result in report["heads"].items():
        if result["n_samples"]:
            log_figure(reliability_figure(report, head), f"evaluation/{split}_reliability_{head}.png")
    if report["breakdowns"].get("severity"):
        log_figure(breakdown_figure(report), f"evaluation/{split}_breakdown_severity.png")


def log_competition_score(labels: pd.DataFrame, submission: pd.DataFrame, prior: pd.DataFrame | None, split: str
                          ) -> dict[str, float]:
    """Log the competition score of ``submission`` on ``labels`` into the active run, the same way for a
    classifier at the labelled sites and for the study pipeline: ``<split>_rsna_score`` with its 95 %
    bootstrap CI over studies (``_ci_low``/``_ci_high``) and its terms ``<split>_rsna_<term>`` as metrics;
    every term's CI and (``prior``: a submission of the same studies) the prior's values as the table
    :func:`site_score_artifact`; the per-study terms as ``evaluation/<split>_rsna_score.terms.csv``.
    Returns the metrics; a MetricError (nothing to score) is the caller's."""
    terms = competition.score_terms(labels, submission)
    mlflow.log_text(terms.reset_index().to_csv(index=False), paired.terms_artifact(f"{split}_rsna_score"))
    baseline = {}
    if prior is not None:
        prior_terms = competition.score_terms(labels, prior).reset_index()
        baseline = {name: value for name, (value, _, _) in paired.score_intervals(prior_terms, resamples=1).items()}
    metrics, rows = {}, []
    for name, (value, low, high) in paired.score_intervals(terms.reset_index()).items():
        key = f"{split}_rsna_score" if name == "score" else f"{split}_rsna_{name}"
        metrics[key] = value
        if name == "score":
            metrics.update({f"{key}_ci_low": low, f"{key}_ci_high": high})
        rows.append({"term": name, "value": value, "ci_low": low, "ci_high": high, "prior": baseline.get(name)})
    mlflow.log_metrics(metrics)
    mlflow.log_table(pd.DataFrame(rows), site_score_artifact(split))
    return metrics


def site_score_artifact(split: str) -> str:
    """The MLflow table of a run's competition score and its terms, each with its CI and the prior's value."""
    return f"evaluation/{split}_rsna_score_table.json"


def prior_site_score(run_id: str, split: str) -> float:
    """The weight-aware prior's competition score on a run's ``split`` (from its score table; NaN where absent)."""
    table = logged_table(run_id, site_score_artifact(split))
    row = table[table["term"] == "score"] if table is not None else ()
    return float(row["prior"].iloc[0]) if len(row) and pd.notna(row["prior"].iloc[0]) else float("nan")


def table_artifact(split: str) -> str:
    """Where a run keeps every number of its evaluation of ``split`` (an MLflow table)."""
    return f"evaluation/{split}_table.json"


def evaluate_run(run_id: str, split: str = "test", *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Evaluate the model a training run logged on one of its splits and log the result into that run.

    Rebuilds the run's data from its own ``config.yaml`` (the cache makes this fast), predicts the split with the
    logged model, and leaves the run's status and end time as they were. Returns the report.
    """
    if split not in SPLITS:
        raise EvaluationError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise EvaluationError(f"run {run_id!r} not found in {mlflow.get_tracking_uri()}; check the run id in the "
                              "MLflow UI or set MLFLOW_TRACKING_URI to the store that holds it") from None
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise EvaluationError(f"another MLflow run ({active.info.run_id}) is active in this process; end it before "
                              f"evaluating run {run_id}")
    models = [m for m in mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                     filter_string=f"source_run_id = '{run_id}'", output_format="list")
              if m.status == LoggedModelStatus.READY]
    if not models:
        raise EvaluationError(f"run {run_id} ({run.info.run_name}) has no logged model, like a tuning trial or a "
                              "study's parent run; evaluate the run that trained the final model")
    model = max(models, key=lambda m: m.creation_timestamp)
    config = _run_config(run_id)
    data_dir = config.data.data_dir or "the built-in phantom"
    try:
        dataset, samples = prepare_data(config)
    except (DatasetError, PrepareError, ImageReadError, OSError) as exc:
        raise EvaluationError(f"cannot rebuild the data of run {run_id} from data_dir {data_dir}: {exc}; restore the "
                              "files it was trained on (or point data.data_dir to a copy)") from None
    part = split_data(samples, split)
    if not (part.targets["severity"] >= 0).any():  # what training calls a labelled sample
        raise EvaluationError(f"the {split} split of {data_dir} has no labelled samples ({len(part)} samples, "
                              "none with a severity grade); evaluate another split")

    classifier = load_classifier(model.model_uri)
    # The batches training evaluated with, so the shared test_* metrics come out the same.
    proba = predict_cached(classifier, dataset.path / "images.npy", part, config.train.batch_size)
    report = evaluate_predictions(part.samples, part.targets, proba, n_boot=n_boot, seed=seed,
                                  train_targets=split_data(samples, "train").targets)
    trained_on = classifier.meta.get("data_fingerprint")
    if trained_on and trained_on != dataset.fingerprint:
        warnings.warn(f"the data of run {run_id} changed since training (cache {dataset.fingerprint}, model trained "
                      f"on {trained_on}): the {split} split may hold other samples", stacklevel=2)
    report = {"run_id": run_id, "split": split, "model_uri": model.model_uri, "data_dir": data_dir,
              "data_fingerprint": dataset.fingerprint, "trained_data_fingerprint": trained_on, **report}

    if active is not None:  # evaluating the run this process is logging (train's own run)
        log_evaluation(report, split)
        return report
    status, end_time = run.info.status, run.info.end_time
    # Reopened as this process's run, with its status noted: if this process dies before the end
    # below, the next command puts that status back (spinemri.tracking.runs.reap_dead_runs).
    owner = run.data.tags.get(PROCESS_TAG)
    # MLflow refuses to resume a run of another experiment than the active one (MLFLOW_EXPERIMENT_ID, an
    # earlier set_experiment): the run's own experiment is made the active one.
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    start_run(run_id=run_id, tags={RESUMED_FROM_TAG: status} if status != "RUNNING" else {})
    try:
        log_evaluation(report, split)
    finally:
        mlflow.end_run()
        # Resuming marks the run RUNNING and ending it stamps a new end time: put back what training left.
        if status != "RUNNING":
            client.delete_tag(run_id, RESUMED_FROM_TAG)
        if owner:
            client.set_tag(run_id, PROCESS_TAG, owner)
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status, end_time=end_time)
    return report


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


def _run_config(run_id: str) -> ExperimentConfig:
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    except (MlflowException, OSError):
        raise EvaluationError(f"run {run_id} has no config.yaml artifact, so its data cannot be rebuilt; only runs "
                              "logged by `spinemri train` can be evaluated") from None
    try:
        return from_dict(yaml.safe_load(text) or {}, source=f"run {run_id} config.yaml").validate()
    except ConfigError as exc:
        raise EvaluationError(f"run {run_id} config.yaml no longer loads with this version: {exc}") from None


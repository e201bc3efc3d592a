"""Evaluate the model a training run logged: the run's data rebuilt from its own config.yaml (:func:`run_config`),
one of its splits predicted with the logged model, the report logged into that run (spinemri.tracking.reports).
"""

from __future__ import annotations

from typing import Any
import warnings

import mlflow
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
import yaml

from spinemri.api.source import prepare_data
from spinemri.config import ExperimentConfig, from_dict
from spinemri.data.schema import SPLITS
from spinemri.errors import ConfigError, DatasetError, EvaluationError, ImageReadError, PrepareError
from spinemri.metrics.heads import evaluate_predictions
from spinemri.serving.classifier import load_classifier
from spinemri.tracking.reports import log_evaluation
from spinemri.tracking.runs import PROCESS_TAG, RESUMED_FROM_TAG, start_run
from spinemri.training.classifier import predict_cached
from spinemri.training.data import split_data


def run_config(run_id: str) -> ExperimentConfig:
    """The experiment config a training run logged (its ``config.yaml``), validated by this version."""
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    except (MlflowException, OSError):
        raise EvaluationError(f"run {run_id} has no config.yaml artifact, so its data cannot be rebuilt; only runs "
                              "logged by `spinemri train` can be evaluated") from None
    try:
        return from_dict(yaml.safe_load(text) or {}, source=f"run {run_id} config.yaml").validate()
    except ConfigError as exc:
        raise EvaluationError(f"run {run_id} config.yaml no longer loads with this version: {exc}") from None


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
    config = run_config(run_id)
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

"""``run_experiment(config)``: the one entry point of every training, whatever the experiment asks for.

    task localize, split.folds K   a nested run per fold of the localizer, out-of-fold point errors
    task localize                  one localizer, registered
    tuning.trials N                an Optuna study, then the best configuration retrained and registered
    otherwise                      one classifier (or, with split.folds K, its cross-validation), registered

The outcome says which it was and carries the library's own result, for the caller to print or use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import mlflow

from spinemri.api.classifier import train
from spinemri.api.localizer import train_localizer
from spinemri.api.localizer_cv import cross_validate_localizer
from spinemri.api.tune import tune
from spinemri.config import ExperimentConfig
from spinemri.errors import ConfigError
from spinemri.tracking.links import run_url, ui_base_url

KINDS = ("localizer_cv", "localizer", "tuned", "trained")


@dataclass(frozen=True)
class Outcome:
    """What :func:`run_experiment` did: its ``kind`` (one of KINDS), the training's result (``run_id``,
    ``metrics``, and for a model ``model_uri``, ``epochs_trained``; a classifier's ``verdict``), when
    tuned the Optuna study's summary, and the run's page in the MLflow UI."""

    kind: str
    result: Any
    study: Any = None
    link: str = ""


def run_experiment(config: ExperimentConfig) -> Outcome:
    """Train what ``config`` describes, in MLflow runs of its experiment (see the module docstring)."""
    outcome = _run(config)
    run_id = getattr(outcome.result, "run_id", "")
    if not run_id:  # a worker of a multi-worker training other than the chief
        return outcome
    experiment_id = mlflow.get_run(run_id).info.experiment_id
    return replace(outcome, link=run_url(ui_base_url(mlflow.get_tracking_uri(), config.mlflow.ui_url), experiment_id,
                                         run_id))


def _run(config: ExperimentConfig) -> Outcome:
    if config.task == "localize":
        if config.tuning.trials > 0:
            raise ConfigError("tuning a localizer (--task localize with --trials) is not implemented; train it with "
                              "--trials 0 and set its hyperparameters with --set")
        if config.split.folds:
            return Outcome("localizer_cv", cross_validate_localizer(config))
        return Outcome("localizer", train_localizer(config))
    if config.tuning.trials > 0:
        study = tune(config)
        return Outcome("tuned", study.final, study)
    return Outcome("trained", train(config))

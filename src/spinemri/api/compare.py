"""``compare_runs``: the thesis's Table 3.1 from MLflow runs, given an experiment file or an MLflow experiment name.

An experiment file (a name under experiments/ or a path) names its MLflow experiment and the backbones to
compare (``compare.archs``), and can train them first; any other name is read as an MLflow experiment whose
latest finished run per backbone fills the table.
"""

from __future__ import annotations

from dataclasses import dataclass

from spinemri.api.classifier import train
from spinemri.config import ExperimentConfig, load_experiment, parse_override, resolve_experiment, with_values
from spinemri.errors import ConfigError
from spinemri.evaluation.compare import Comparison, build_table, compare_link, latest_runs, log_table, verdicts


@dataclass(frozen=True)
class CompareOutcome:
    comparison: Comparison
    experiment: str  # the MLflow experiment of the runs compared
    run_id: str  # the summary run the table was logged to
    link: str  # the MLflow UI's compare page of the runs
    verdicts: list[str]  # each backbone's verdict against its floor


def compare_runs(experiment: str, *, train: bool = False, skip_existing: bool = False, head: str = "condition",
                 folds: int = 0, settings: tuple[str, ...] = ()) -> CompareOutcome:
    """Build (``train``: after training every backbone of the experiment file) and log the comparison table.

    ``folds`` K >= 2 compares K-fold cross-validations, 0 single-split test runs; ``settings`` are
    ``KEY=VALUE`` changes to the experiment file (for training)."""
    if folds == 1:
        raise ConfigError("cross-validation needs at least 2 folds (--folds 0: single-split runs)")
    overrides = dict(parse_override(item) for item in settings if item.strip())
    if folds and train:
        overrides["split.folds"] = folds
    try:
        resolve_experiment(experiment)
    except ConfigError:
        if train or overrides:
            raise
        config, mlflow_experiment, archs = None, experiment, None  # not a file: an MLflow experiment name
    else:
        config = load_experiment(experiment, overrides)
        mlflow_experiment, archs = config.mlflow.experiment, config.compare.archs
    if train:
        train_all(config, skip_existing=skip_existing)
    comparison = build_table(mlflow_experiment, head, archs, folds)
    link = compare_link(comparison, config.mlflow.ui_url if config else "")
    run_id = log_table(comparison, link)
    return CompareOutcome(comparison, mlflow_experiment, run_id, link, verdicts(comparison.table))


def train_all(config: ExperimentConfig, *, skip_existing: bool = False) -> list[str]:
    """Train each backbone in ``config.compare.archs`` with otherwise identical settings; returns run ids."""
    done = set(latest_runs(config.mlflow.experiment, config.split.folds)) if skip_existing else set()
    run_ids = []
    for arch in config.compare.archs:
        if arch in done:
            print(f"{arch}: a finished run exists, skipped (--skip-existing)", flush=True)
            continue
        print(f"== training {arch} ({len(run_ids) + 1}/{len(config.compare.archs)}) ==", flush=True)
        result = train(with_values(config, {"model.arch": arch}))
        run_ids.append(result.run_id)
    return run_ids

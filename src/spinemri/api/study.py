"""The study pipeline's commands as functions: a submission evaluated from its data folder, and the ablation
from its two experiment files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinemri.api.ablation import AblationResult, ablation_configs, run_ablation
from spinemri.api.settings import experiment_config
from spinemri.config import load_experiment, parse_override
from spinemri.errors import ConfigError, MetricError
from spinemri.study.evaluate import evaluate_study_files, log_study_evaluation


@dataclass(frozen=True)
class StudyEvaluation:
    report: dict[str, Any]  # evaluate_study_files' report: the model's terms, the prior's, the verdict
    run_id: str | None  # the run it was logged to (None: not logged)


def sites_beside(submission: str | Path) -> Path:
    """Where ``predict-study`` writes a submission's sites table: ``<submission>.sites.csv`` beside it."""
    submission = Path(submission)
    return submission.with_name(submission.stem + ".sites.csv")


def evaluate_study(data_dir: str | Path, submission: str | Path, *, sites: str | Path | None = None,
                   prior_labels: str | Path | None = None, classifier: str = "models:/spinemri@champion",
                   log: bool = True) -> StudyEvaluation:
    """Score a submission on the studies of ``data_dir``'s train.csv beside the per-site prior; ``log``: as a
    run of the spinemri-study experiment, with the sites table (``sites``, default :func:`sites_beside`)."""
    labels_path = Path(data_dir) / "train.csv"
    if not labels_path.is_file():
        raise MetricError(f"{labels_path} is missing; evaluate-study needs the studies' labels")
    report = evaluate_study_files(labels_path, submission, prior_labels_path=prior_labels, classifier_uri=classifier)
    run_id = None
    if log:
        run_id = log_study_evaluation(report, labels_path, Path(submission), Path(sites or sites_beside(submission)),
                                      {"data_dir": str(data_dir)})
    return StudyEvaluation(report, run_id)


def ablation(experiment: str, localizer_experiment: str, *, flags: dict | None = None, settings: tuple[str, ...] = (),
             localizer_settings: tuple[str, ...] = (), studies: int | None = None, slices: int = 5, members: int = 2,
             mlflow_experiment: str = "spinemri-ablation") -> AblationResult:
    """Cross-validate the study pipeline and each addition on the same folds (spinemri.api.ablation): the
    classifier's experiment with its flags and ``settings``, the localizers' with ``localizer_settings``."""
    if studies is not None:
        settings = (*settings, f"data.phantom_studies={studies}")
    config = experiment_config(experiment, flags or {}, settings)
    try:
        localizer = load_experiment(localizer_experiment,
                                    dict(parse_override(item) for item in localizer_settings if item.strip()))
    except ConfigError as exc:
        given = " ".join(f"--localizer-set {item}" for item in localizer_settings)
        raise ConfigError(f"the localizers' settings (--localizer-experiment {localizer_experiment} {given}): "
                          f"{exc}") from None
    classifier, localizer = ablation_configs(config, localizer, mlflow_experiment)
    return run_ablation(classifier, localizer, slices=slices, members=members)

"""A submission scored with the competition metric on its studies, beside the prior baseline, and logged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import mlflow
import pandas as pd

from spinemri.errors import StudyError, UserError
from spinemri.metrics.competition import label_rows, rsna_score
from spinemri.metrics.floor import compare_submissions
from spinemri.metrics.prior import prior_from_labels, prior_submission
from spinemri.serving.classifier import load_classifier
from spinemri.serving.study_predictor import classifier_prior
from spinemri.tracking.reports import log_competition_score
from spinemri.tracking.runs import log_headline, start_run, use_experiment


def evaluate_submission(labels: pd.DataFrame, submission: pd.DataFrame, prior_labels: pd.DataFrame | None = None, *,
                        prior: Mapping[str, Sequence[float]] | None = None, prior_source: str = "") -> dict:
    """rsna_score of ``submission`` on the studies it covers, beside the weight-aware prior baseline.

    The baseline learns from ``prior_labels`` (train.csv layout; none of the scored studies), or is
    ``prior`` as given (a classifier's recorded training prior, named by ``prior_source``).
    """
    rows = submission["row_id"].astype(str)
    studies = sorted(rows.str.split("_", n=1).str[0].unique())
    scored = labels[labels["study_id"].astype(str).isin(studies)]
    missing = sorted(set(studies) - set(scored["study_id"].astype(str)))
    if missing:
        raise StudyError(f"the labels do not have {len(missing)} submitted study(ies): {', '.join(missing[:5])}")
    prior_studies = 0
    if prior is None:
        if prior_labels is None:
            raise StudyError("the prior baseline needs labels of other studies or a recorded prior")
        overlap = set(prior_labels["study_id"].astype(str)) & set(studies)
        if overlap:
            raise StudyError(f"the prior's labels include {len(overlap)} scored study(ies); the baseline must not "
                             "see them")
        prior = prior_from_labels(prior_labels)
        prior_studies = int(prior_labels["study_id"].nunique())
        prior_source = prior_source or f"the labels of {prior_studies} other studies"
    floor = prior_submission(studies, prior)
    model = rsna_score(scored, submission, return_parts=True)
    baseline = rsna_score(scored, floor, return_parts=True)
    verdict = compare_submissions(scored, submission, floor)
    return {"studies": len(studies), "verdict": verdict.to_dict(), "model": model, "prior_baseline": baseline,
            "prior": dict(prior), "prior_studies": prior_studies, "prior_source": prior_source}


def evaluate_study_files(labels_path: str | Path, submission_path: str | Path, *,
                         prior_labels_path: str | Path | None = None, classifier_uri: str | None = None) -> dict:
    """:func:`evaluate_submission` for files: the labels (train.csv layout) and a submission CSV.

    The baseline's prior comes from ``prior_labels_path``, else from the labelled studies of
    ``labels_path`` that are not submitted, else (none left: the labels hold only the submitted
    studies) from the prior recorded with ``classifier_uri``, and the report says which.
    """
    labels = _read_labels(labels_path, "labels")
    table = _read_table(submission_path, "submission", dtype={"row_id": str})
    if "row_id" not in table.columns:
        raise StudyError(f"{submission_path} has no row_id column; expected row_id,normal_mild,moderate,severe")
    studies = set(table["row_id"].astype(str).str.split("_", n=1).str[0])
    if prior_labels_path is not None:
        return evaluate_submission(labels, table, _read_labels(prior_labels_path, "--prior-labels"),
                                   prior_source=f"--prior-labels {prior_labels_path}")
    others = labels[~labels["study_id"].isin(studies)]
    if not label_rows(others)["severity"].notna().any():
        if not classifier_uri:
            raise StudyError(f"{labels_path} labels only the {len(studies)} submitted studies, so no other study is "
                             "left to learn the prior baseline from; pass --prior-labels FILE (labels of other "
                             "studies) or --classifier URI (use the prior recorded with that classifier)")
        try:
            prior, source = classifier_prior(load_classifier(classifier_uri))
        except UserError as exc:
            raise StudyError(f"{labels_path} labels only the submitted studies, and the fallback prior could not be "
                             f"read: {exc}; pass --prior-labels FILE (labels of other studies) or another "
                             "--classifier") from None
        return evaluate_submission(labels, table, prior=prior,
                                   prior_source=f"{source} ({classifier_uri}): {labels_path} labels no other study")
    return evaluate_submission(labels, table, others)


def _read_table(path, what: str, **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except FileNotFoundError:
        raise StudyError(f"{what} {path} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise StudyError(f"{what} {path} is not a readable CSV ({type(exc).__name__}: {exc})") from None


def _read_labels(path, what: str) -> pd.DataFrame:
    labels = _read_table(path, what, dtype={"study_id": str})
    if "study_id" not in labels.columns:
        raise StudyError(f"{what} {path} has no study_id column; expected train.csv's layout")
    return labels


def log_study_evaluation(report: Mapping, labels_path: Path, submission_path: Path, sites_path: Path | None,
                         tags: Mapping[str, str]) -> str:
    """One MLflow run in ``spinemri-study`` with the score under the names every run uses
    (``test_rsna_score`` with its CI, ``test_rsna_<term>``; the terms' CIs and the prior baseline in
    ``evaluation/test_rsna_score_table.json``: spinemri.api.evaluate.log_competition_score) and the files."""
    labels = _read_labels(labels_path, "labels")
    submission = _read_table(submission_path, "submission", dtype={"row_id": str})
    studies = sorted(submission["row_id"].astype(str).str.split("_", n=1).str[0].unique())
    scored = labels[labels["study_id"].astype(str).isin(studies)]
    use_experiment("spinemri-study")
    with start_run(run_name=f"study-evaluation-{report['studies']}-studies") as run:
        mlflow.set_tags({"role": "study-evaluation", **tags, **_verdict_tags(report["verdict"]),
                         "mlflow.note.content": report["verdict"]["sentence"]})
        mlflow.set_tag("prior_source", report.get("prior_source", ""))
        scores = log_competition_score(scored, submission, prior_submission(studies, report["prior"]), "test")
        metrics = {"test_studies": report["studies"], "prior_studies": report["prior_studies"],
                   **verdict_metrics(report["verdict"], "test")}
        if sites_path is not None and sites_path.is_file():
            sites = pd.read_csv(sites_path)
            metrics["test_rows_from_prior"] = int((sites["source"] == "prior").sum())
            mlflow.log_artifact(str(sites_path), "study")
        mlflow.log_metrics(metrics)
        log_headline({**scores, **metrics}, "test_rsna_score")
        mlflow.log_artifact(str(submission_path), "study")
        mlflow.log_text(json.dumps(report, indent=2), "study/evaluation.json")
        return run.info.run_id


def verdict_metrics(verdict: Mapping, split: str) -> dict[str, float]:
    """A report's verdict (:meth:`spinemri.metrics.floor.Verdict.to_dict`) as ``<split>_vs_floor`` metrics."""
    return {f"{split}_vs_floor": verdict["difference"], f"{split}_vs_floor_ci_low": verdict["ci_low"],
            f"{split}_vs_floor_ci_high": verdict["ci_high"], f"{split}_floor_rsna_score": verdict["floor"]}


def _verdict_tags(verdict: Mapping) -> dict[str, str]:
    return {"verdict": verdict["outcome"], "verdict_sentence": verdict["sentence"], "verdict_metric": verdict["metric"],
            "floor_difference": f"{verdict['difference']:+.4f}", "floor_ci_low": f"{verdict['ci_low']:+.4f}",
            "floor_ci_high": f"{verdict['ci_high']:+.4f}", "floor_studies": str(verdict["studies"])}

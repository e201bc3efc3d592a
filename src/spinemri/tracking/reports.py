"""An evaluation report logged into an MLflow run: metrics, tables, JSON, Markdown and figures.

:func:`log_evaluation` writes a report (spinemri.metrics.heads) into the active run; :func:`log_competition_score`
the competition score with its CI and the prior's value; the artifact names are defined here once.
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

import mlflow
import pandas as pd

from spinemri.metrics import competition, paired
from spinemri.metrics.report import (breakdown_figure, evaluation_markdown, evaluation_metrics, evaluation_table,
    reliability_figure)
from spinemri.tracking.runs import log_figure, logged_table


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

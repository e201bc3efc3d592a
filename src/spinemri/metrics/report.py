"""An evaluation report (spinemri.metrics.heads) as headline MLflow metrics, one table of every number,
Markdown tables and figures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from spinemri.data.schema import short_name
from spinemri.metrics.goals import lower_is_better
from spinemri.metrics.heads import BREAKDOWNS, PER_CLASS_METRICS
from spinemri.metrics.plots import plt


def evaluation_metrics(report: Mapping[str, Any], split: str) -> dict[str, float]:
    """The headline MLflow metrics of a report, the same set for every run: per head
    ``<split>_<head>_<metric>`` (accuracy, balanced accuracy, macro ROC-AUC, F1, precision and recall, log
    loss, ECE; for severity also the weighted log loss) with ``_ci_low`` / ``_ci_high``. Per-class values,
    the breakdowns by condition and level, and the baselines are rows of :func:`evaluation_table` instead.
    Undefined values are left out."""
    out: dict[str, float] = {}
    for head, result in report["heads"].items():
        for metric, entry in result.get("metrics", {}).items():
            for suffix, key in (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high")):
                if entry.get(key) is not None:
                    out[f"{split}_{head}_{metric}{suffix}"] = float(entry[key])
    return out


TABLE_COLUMNS = ("head", "scope", "group", "metric", "value", "ci_low", "ci_high", "n_valid", "n_samples",
                 "majority", "prior")


def evaluation_table(report: Mapping[str, Any]) -> pd.DataFrame:
    """Every number of a report as one row (what ``evaluation/<split>_table.json`` holds): ``scope`` is
    ``head`` for the headline metrics, ``class`` for per-class scores, ``condition`` or ``level`` for the
    severity breakdowns; ``majority`` and ``prior`` are the two constant baselines of the same metric."""
    rows = []

    def add(head, scope, group, metric, entry, n_samples):
        rows.append({"head": head, "scope": scope, "group": group, "metric": metric,
                     **{key: entry.get(key) for key in ("value", "ci_low", "ci_high", "n_valid", "majority", "prior")},
                     "n_samples": n_samples})

    for head, result in report["heads"].items():
        for metric, entry in result.get("metrics", {}).items():
            add(head, "head", "all", metric, entry, result["n_samples"])
        for cls, scores in result.get("per_class", {}).items():
            for score in PER_CLASS_METRICS:
                add(head, "class", cls, score, scores[score], scores["support"])
    for head, columns in report["breakdowns"].items():
        for column, groups in columns.items():
            for group, result in groups.items():
                for metric, entry in result["metrics"].items():
                    add(head, column, group, metric, entry, result["n_samples"])
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def evaluation_markdown(report: Mapping[str, Any], split: str) -> str:
    """Tables of value [95 % CI] with the majority-class and class-prior baselines beside each number."""
    pct = f"{100 * report['confidence']:g} %"
    source = "training split" if report["baseline_source"] == "train" else "evaluated split (no training labels given)"
    lines = [f"# Evaluation: {split} split", ""]
    if report.get("run_id"):
        lines += [f"Run `{report['run_id']}`, model `{report.get('model_uri', '')}`.", ""]
    lines += [(f"{report['n_samples']} samples from {_studies(report['n_studies'])}. {pct} CI: percentile bootstrap over "
              f"studies ({report['n_boot']} resamples, seed {report['seed']}); `n` = resamples where the metric is "
              f"defined. Baselines: constant predictions from the label distribution of the {source}. "
              f"ECE: {report['ece_bins']} equal-width bins of the top-class probability. Lower is better for the "
              "losses and the ECE. Sampling noise only adds to the ECE, so for a well-calibrated "
              "model its interval can lie above the point estimate."), ""]
    if report["n_studies"] < 10:
        lines += [(f"**Only {_studies(report['n_studies'])}: the intervals are rough at best; evaluate more "
                   "studies before quoting them.**"), ""]
    header = ["| metric | value [" + pct + " CI] | n | majority class | class prior |", "|---|---|---|---|---|"]
    for head, result in report["heads"].items():
        lines += [f"## {head} ({result['n_samples']} labelled samples, {_studies(result['n_studies'])})", ""]
        if not result["n_samples"]:
            lines += ["No labelled samples.", ""]
            continue
        lines += [f"Majority class: {result['baselines']['majority_class']}.", "", *header]
        lines += [_row(metric, entry) for metric, entry in result["metrics"].items()]
        lines += ["", "| class | support | score | value [" + pct + " CI] | n | majority class | class prior |",
                  "|---|---|---|---|---|---|---|"]
        for cls, scores in result["per_class"].items():
            lines += [_row(f"{cls} | {scores['support']} | {score}", scores[score]) for score in PER_CLASS_METRICS]
        lines.append("")
    for head, columns in report["breakdowns"].items():
        for column, groups in columns.items():
            lines += [f"## {head} by {column}", "",
                      (f"| {column} | samples | studies | metric | value [{pct} CI] | n | majority class | "
                       "class prior |"), "|---|---|---|---|---|---|---|---|"]
            for group, result in groups.items():
                lines += [_row(f"{group} | {result['n_samples']} | {result['n_studies']} | {metric}", entry)
                          for metric, entry in result["metrics"].items()]
            lines.append("")
    return "\n".join(lines)


def _studies(count: int) -> str:
    return "1 study" if count == 1 else f"{count} studies"


def _row(label: str, entry: Mapping[str, Any]) -> str:
    interval = f" [{_number(entry['ci_low'])}, {_number(entry['ci_high'])}]" if entry["ci_low"] is not None else ""
    return (f"| {label} | {_number(entry['value'])}{interval} | {entry['n_valid']} | {_number(entry['majority'])} | "
            f"{_number(entry['prior'])} |")


def _number(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def reliability_figure(report: Mapping[str, Any], head: str) -> plt.Figure:
    """Reliability diagram (accuracy vs confidence per bin) and the histogram of confidences of one head."""
    result = report["heads"][head]
    calibration, ece = result["calibration"], result["metrics"]["ece"]
    edges = np.asarray(calibration["edges"])
    width = np.diff(edges)
    accuracy = np.array([np.nan if a is None else a for a in calibration["accuracy"]])
    confidence = np.array([np.nan if c is None else c for c in calibration["confidence"]])
    fig, (diagram, histogram) = plt.subplots(1, 2, figsize=(10, 4.2))
    diagram.bar(edges[:-1], np.nan_to_num(accuracy), width=width, align="edge", color="tab:blue", alpha=0.7,
                edgecolor="white", label="accuracy")
    diagram.plot(confidence, accuracy, "o", color="tab:red", ms=4, label="mean confidence")
    diagram.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    diagram.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-class probability)", ylabel="accuracy")
    interval = f" [{ece['ci_low']:.3f}, {ece['ci_high']:.3f}]" if ece["ci_low"] is not None else ""
    diagram.set_title(f"{head}: ECE {ece['value']:.3f}{interval}")
    diagram.legend(loc="upper left", fontsize=8)
    histogram.bar(edges[:-1], calibration["count"], width=width, align="edge", color="tab:grey", edgecolor="white")
    histogram.set(xlim=(0, 1), xlabel="confidence (top-class probability)", ylabel="samples",
                  title=f"{head}: confidence ({result['n_samples']} samples)")
    fig.tight_layout()
    return fig


def breakdown_figure(report: Mapping[str, Any], metrics=("balanced_accuracy", "weighted_log_loss"),
                     head: str = "severity") -> plt.Figure:
    """Severity metrics per condition and per level: value with its CI, and the two baselines."""
    columns = report["breakdowns"].get(head, {})
    rows = [c for c in BREAKDOWNS if columns.get(c)] or ["condition"]
    fig, axes = plt.subplots(len(rows), len(metrics), figsize=(5.5 * len(metrics), 0.45 * 7 * len(rows) + 1),
                             squeeze=False)
    for r, column in enumerate(rows):
        groups = columns.get(column, {})
        names = list(groups)
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            entries = [groups[g]["metrics"][metric] for g in names]
            position = np.arange(len(names))
            value = np.array([np.nan if e["value"] is None else e["value"] for e in entries])
            low = np.array([np.nan if e["ci_low"] is None else e["ci_low"] for e in entries])
            high = np.array([np.nan if e["ci_high"] is None else e["ci_high"] for e in entries])
            error = np.nan_to_num(np.stack([value - low, high - value]).clip(min=0))
            for key, marker, colour in (("majority", "x", "tab:red"), ("prior", "d", "tab:orange")):
                ax.plot([np.nan if e[key] is None else e[key] for e in entries], position, marker, color=colour,
                        linestyle="none", label=f"{key} baseline")
            ax.errorbar(value, position, xerr=error, fmt="o", color="tab:blue", capsize=3, label="model (95 % CI)")
            ax.set_yticks(position, [f"{short_name(g)} (n={groups[g]['n_samples']})" for g in names], fontsize=8)
            ax.invert_yaxis()
            better = "lower" if lower_is_better(metric) else "higher"
            ax.set_title(f"{head} {metric.replace('_', ' ')} by {column} ({better} is better)", fontsize=9)
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

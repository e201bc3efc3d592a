"""Publishable evaluation of a trained model: per-head metrics with study-level bootstrap CIs, baselines, calibration
and severity breakdowns, logged to the model's MLflow run as metrics, JSON, Markdown and PNG.

Pure functions first (:func:`evaluate_predictions`, :func:`evaluation_metrics`, :func:`evaluation_markdown`, the
figures), MLflow on top (:func:`log_evaluation` into the active run, :func:`evaluate_run` for a finished run).

Definitions (rows whose target is -1 are left out per head):

- ``accuracy``, ``loss``, ``roc_auc``, ``f1_macro``, ``precision_macro``, ``recall_macro`` and severity's
  ``weighted_log_loss`` are exactly :func:`spinemri.training.evaluation.head_metrics` /
  :func:`~spinemri.training.evaluation.weighted_log_loss`, the numbers training logs as ``test_<head>_<metric>``.
  ``roc_auc`` is the mean one-vs-rest AUC over the classes that have both positive and negative rows; the macro
  F1/precision/recall average over the classes present in the labels or the predictions (``zero_division=0``).
- ``balanced_accuracy``: the mean recall over the classes present in the labels (scikit-learn's definition).
- Per class: F1, precision (0 when the class is never predicted) and recall; undefined (null) where the class has
  no labelled row.
- ``ece``: expected calibration error on the top-class probability, 15 equal-width bins on [0, 1]:
  ``sum_b n_b / n * |accuracy_b - mean confidence_b|``.
- CI: 95 % percentile interval over ``n_boot`` resamples of the split's **studies** with replacement (every
  sample of a drawn study comes along, as often as the study is drawn). A metric undefined on a resample (an AUC
  with one class present, a subgroup with no rows drawn) skips that resample; ``n_valid`` says how many counted.
  Rows from a single study get no interval (null). ECE only grows with sampling noise, so for a well-calibrated
  model most resampled ECEs exceed the point estimate and its interval can lie above it.
- Baselines: the same metrics for constant predictions: ``majority`` (probability 1 on the most frequent class)
  and ``prior`` (the class frequencies), both from the training split's labels when given (``baseline_source``).
"""

from __future__ import annotations

import math
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

from spinemri.config import ConfigError, ExperimentConfig, from_dict
from spinemri.data.schema import CONDITIONS, LEVELS
from spinemri.data.splits import SPLITS
from spinemri.errors import UserError
from spinemri.runs import PROCESS_TAG, RESUMED_FROM_TAG, start_run
from spinemri.models.network import HEAD_CLASSES
from spinemri.training import evaluation
from spinemri.training.data import SEVERITY_WEIGHTS, read_rows, split_data
from spinemri.training.plots import plt, short_name
from spinemri.training.tracking import log_figure

HEAD_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "precision_macro", "recall_macro", "loss")
SEVERITY_METRICS = (*HEAD_METRICS, "weighted_log_loss")
PER_CLASS_METRICS = ("f1", "precision", "recall")
LOWER_IS_BETTER = ("loss", "weighted_log_loss", "ece")
BREAKDOWNS = ("condition", "level")  # sample-table columns the severity metrics are broken down by
ECE_BINS = 15
CONFIDENCE = 0.95
MIN_STUDIES_FOR_CI = 2  # one study resampled is always itself: a zero-width interval that would mislead
_BOOT_CELLS = 4_000_000  # resamples x rows per chunk: bounds the memory of the weight matrices (~32 MB each)


class EvaluationError(UserError):
    """A run or split that cannot be evaluated; the message names what is missing and what to do."""


# --- pure evaluation ---------------------------------------------------------------------------

def study_bootstrap_counts(study_ids, n_boot: int, seed: int = 0) -> np.ndarray:
    """How often each row is drawn in each resample of the studies: int64 (n_boot, len(study_ids)).

    Every resample draws as many studies as there are, with replacement; a row's count is its study's count,
    so the rows of one study always travel together.
    """
    codes, studies = pd.factorize(pd.Series(study_ids), sort=True)
    n_studies = len(studies)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_studies, size=(n_boot, n_studies))
    offsets = (np.arange(n_boot) * n_studies)[:, None]
    per_study = np.bincount((draws + offsets).ravel(), minlength=n_boot * n_studies).reshape(n_boot, n_studies)
    return per_study[:, codes]


def resample_scores(y: np.ndarray, proba: np.ndarray, weights: np.ndarray, *, severity: bool = False
                    ) -> dict[str, np.ndarray]:
    """Every metric of one head for many resamples at once.

    ``y`` int (n,) class indices >= 0; ``proba`` float (n, K); ``weights`` (B, n): how many times each row is in
    each resample (a row of ones is the rows as they are). Returns float64 (B,) per metric of
    :data:`HEAD_METRICS` (+ ``weighted_log_loss`` when ``severity``) and ``ece``, and (B, K) under
    ``f1_per_class``/``precision_per_class``/``recall_per_class``; NaN where undefined for a resample.
    """
    weights = np.asarray(weights, dtype=np.float64)
    n, n_classes = proba.shape
    predicted = proba.argmax(axis=1)
    cells = np.zeros((n, n_classes * n_classes))
    cells[np.arange(n), y * n_classes + predicted] = 1.0
    confusion = (weights @ cells).reshape(-1, n_classes, n_classes)  # [resample, true, predicted]
    total = confusion.sum(axis=(1, 2))
    hits = np.diagonal(confusion, axis1=1, axis2=2)
    support, predicted_count = confusion.sum(axis=2), confusion.sum(axis=1)
    present = (support > 0) | (predicted_count > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, hits / support, np.nan)
        precision = np.where(predicted_count > 0, hits / predicted_count, 0.0)
        f1 = np.where(present, 2 * hits / (support + predicted_count), np.nan)
        n_present = present.sum(axis=1)

        def macro(per_class):
            return np.where(n_present > 0, np.where(present, np.nan_to_num(per_class), 0).sum(axis=1) / n_present,
                            np.nan)

        out = {
            "accuracy": hits.sum(axis=1) / total,
            "balanced_accuracy": np.nansum(recall, axis=1) / (support > 0).sum(axis=1),
            "roc_auc": _macro_auc(y, proba, weights),
            "f1_macro": macro(f1),
            "precision_macro": macro(precision),
            "recall_macro": macro(recall),
            "loss": weights @ _sample_log_loss(y, proba) / total,
        }
        if severity:
            sample_weight = SEVERITY_WEIGHTS[y].astype(np.float64)
            out["weighted_log_loss"] = weights @ (sample_weight * _sample_weighted_log_loss(y, proba)) / (
                weights @ sample_weight)
        out["ece"] = _ece(y, proba, weights, total)
        has_class = support > 0
        out["f1_per_class"] = np.where(has_class, f1, np.nan)
        out["precision_per_class"] = np.where(has_class, precision, np.nan)
        out["recall_per_class"] = recall
    return out


def evaluate_predictions(samples: pd.DataFrame, targets: Mapping[str, np.ndarray], proba: Mapping[str, np.ndarray],
                         *, n_boot: int = 1000, seed: int = 0,
                         train_targets: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The evaluation report of one split, JSON-able (NaN becomes null); see the module docstring.

    ``samples`` is the split's sample table (``study_id``; ``condition`` and ``level`` for the breakdowns), row i
    matching ``targets[head][i]`` (int, -1 = unknown) and ``proba[head][i]`` (float (n, K) per head of
    :data:`~spinemri.models.network.HEAD_CLASSES`). ``train_targets``: the training split's targets, for the
    baselines (else the evaluated split's own label distribution is used, and the report says so).
    Layout: ``heads.<head>.metrics.<metric>`` and ``heads.<head>.per_class.<class>.<f1|precision|recall>`` are
    ``{value, ci_low, ci_high, n_valid, majority, prior}``; ``breakdowns.severity.<condition|level>.<group>``
    holds the severity metrics of that subgroup in the same form.
    """
    n = len(samples)
    if "study_id" not in samples.columns:
        raise ValueError("samples needs a study_id column (the bootstrap resamples studies)")
    for head in targets:
        if head not in HEAD_CLASSES:
            raise ValueError(f"unknown head {head!r}; heads: {', '.join(HEAD_CLASSES)}")
        shape = np.shape(proba[head])
        if len(targets[head]) != n or shape != (n, len(HEAD_CLASSES[head])):
            raise ValueError(f"{head}: expected {n} targets and probabilities of shape ({n}, "
                             f"{len(HEAD_CLASSES[head])}) for {n} samples, got {len(targets[head])} and {shape}")
    labelled = {head: np.asarray(t) >= 0 for head, t in targets.items()}
    if not any(mask.any() for mask in labelled.values()):
        raise ValueError(f"none of the {n} samples has a label (all targets are -1)")
    counts = study_bootstrap_counts(samples["study_id"].to_numpy(), n_boot, seed)

    report: dict[str, Any] = {
        "n_samples": n, "n_studies": samples["study_id"].nunique(),
        "n_boot": n_boot, "seed": seed, "confidence": CONFIDENCE, "resampling": "study",
        "baseline_source": "train" if train_targets is not None else "evaluated split",
        "ece_bins": ECE_BINS, "heads": {}, "breakdowns": {},
    }
    baselines = {}
    for head, y_all in targets.items():
        source = np.asarray((targets if train_targets is None else train_targets)[head])
        frequencies = np.bincount(source[source >= 0], minlength=len(HEAD_CLASSES[head])).astype(np.float64)
        if frequencies.sum() == 0:
            raise ValueError(f"{head}: the {report['baseline_source']} has no labelled rows to build baselines from")
        baselines[head] = frequencies / frequencies.sum()
        keep = np.flatnonzero(labelled[head])
        if len(keep) == 0:
            report["heads"][head] = {"classes": list(HEAD_CLASSES[head]), "n_samples": 0, "n_studies": 0}
            continue
        y, p = np.asarray(y_all)[keep], np.asarray(proba[head])[keep]
        n_studies = samples["study_id"].iloc[keep].nunique()
        entries = _entries(head, y, p, counts[:, keep], baselines[head], n_studies)
        prior = baselines[head]
        report["heads"][head] = {
            "classes": list(HEAD_CLASSES[head]),
            "n_samples": len(keep),
            "n_studies": n_studies,
            "metrics": entries["metrics"],
            "per_class": {name: {"support": int((y == k).sum()), **entries["per_class"][name]}
                          for k, name in enumerate(HEAD_CLASSES[head])},
            "baselines": {"majority_class": HEAD_CLASSES[head][int(prior.argmax())],
                          "prior": {name: float(f) for name, f in zip(HEAD_CLASSES[head], prior)}},
            "calibration": calibration_bins(y, p),
        }
    if "severity" in targets and labelled["severity"].any():
        report["breakdowns"]["severity"] = _severity_breakdowns(samples, targets["severity"], proba["severity"],
                                                                counts, baselines["severity"])
    return _plain(report)


def calibration_bins(y: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> dict[str, list]:
    """Per equal-width bin of the top-class probability: edges (bins + 1), count, accuracy, mean confidence."""
    confidence = proba.max(axis=1).astype(np.float64)
    correct = (proba.argmax(axis=1) == y).astype(np.float64)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore"):
        accuracy = np.bincount(index, correct, minlength=bins) / count
        mean_confidence = np.bincount(index, confidence, minlength=bins) / count
    return {"edges": np.linspace(0, 1, bins + 1).tolist(), "count": count.tolist(),
            "accuracy": accuracy.tolist(), "confidence": mean_confidence.tolist()}


def _entries(head: str, y: np.ndarray, proba: np.ndarray, counts: np.ndarray, prior: np.ndarray,
             n_studies: int) -> dict:
    """{metrics: {name: entry}, per_class: {class: {score: entry}}} for one head or one subgroup."""
    severity = head == "severity"
    if n_studies < MIN_STUDIES_FOR_CI:
        counts = counts[:0]
    names = (*(SEVERITY_METRICS if severity else HEAD_METRICS), "ece")
    value = _point_scores(head, y, proba)
    majority = _point_scores(head, y, np.tile(np.eye(len(prior))[prior.argmax()], (len(y), 1)))
    baseline = _point_scores(head, y, np.tile(prior, (len(y), 1)))
    boot = _bootstrap(y, proba, counts, severity)

    def entry(name, k=None):
        pick = (lambda d: d[name]) if k is None else (lambda d: d[f"{name}_per_class"][..., k])
        return {"value": float(pick(value)), **_interval(pick(boot)), "majority": float(pick(majority)),
                "prior": float(pick(baseline))}

    return {"metrics": {name: entry(name) for name in names},
            "per_class": {cls: {score: entry(score, k) for score in PER_CLASS_METRICS}
                          for k, cls in enumerate(HEAD_CLASSES[head])}}


def _point_scores(head: str, y: np.ndarray, proba: np.ndarray) -> dict:
    """The scores of the rows as they are; the metrics training logs come from the same functions it uses."""
    scores = {k: v[0] for k, v in resample_scores(y, proba, np.ones((1, len(y))), severity=head == "severity").items()}
    with warnings.catch_warnings():
        # head_metrics clips to 1e-7, so a one-hot baseline no longer sums to one; the loss is still what we want
        warnings.filterwarnings("ignore", message="The y_prob values do not sum to one")
        scores.update(evaluation.head_metrics(y, proba))
    if head == "severity":
        scores["weighted_log_loss"] = evaluation.weighted_log_loss(y, proba)
    return scores


def _bootstrap(y: np.ndarray, proba: np.ndarray, counts: np.ndarray, severity: bool) -> dict[str, np.ndarray]:
    n_boot, n = counts.shape
    if n_boot == 0:
        return {k: v[:0] for k, v in resample_scores(y, proba, np.ones((1, n)), severity=severity).items()}
    chunk = max(1, _BOOT_CELLS // max(n, 1))
    parts = [resample_scores(y, proba, counts[i:i + chunk], severity=severity) for i in range(0, n_boot, chunk)]
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def _interval(values: np.ndarray) -> dict[str, Any]:
    valid = values[np.isfinite(values)]
    if len(valid) < 2:
        return {"ci_low": None, "ci_high": None, "n_valid": len(valid)}
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(valid, [tail, 100 - tail])
    return {"ci_low": float(low), "ci_high": float(high), "n_valid": len(valid)}


def _severity_breakdowns(samples: pd.DataFrame, severity: np.ndarray, proba: np.ndarray, counts: np.ndarray,
                         prior: np.ndarray) -> dict:
    known = {"condition": CONDITIONS, "level": LEVELS}
    out: dict[str, dict] = {}
    severity = np.asarray(severity)
    for column in BREAKDOWNS:
        if column not in samples.columns:
            continue
        values = samples[column].to_numpy(dtype=object)
        present = {v for v, s in zip(values, severity) if s >= 0 and isinstance(v, str)}
        groups = [v for v in known[column] if v in present] + sorted(present - set(known[column]))
        out[column] = {}
        for group in groups:
            keep = np.flatnonzero((values == group) & (severity >= 0))
            n_studies = samples["study_id"].iloc[keep].nunique()
            entries = _entries("severity", severity[keep], np.asarray(proba)[keep], counts[:, keep], prior, n_studies)
            out[column][group] = {"n_samples": len(keep), "n_studies": n_studies, "metrics": entries["metrics"]}
    return out


def _macro_auc(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean one-vs-rest AUC over the classes with positive and negative rows in each resample (NaN if none).

    A resampled AUC is the Mann-Whitney statistic with each row counted ``weight`` times (ties count half),
    which is what roc_auc_score gives on the resample written out row by row.
    """
    aucs = []
    for k in range(proba.shape[1]):
        score = proba[:, k]
        order = np.argsort(score, kind="stable")
        sorted_score = score[order]
        starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])  # groups of tied scores
        w = weights[:, order]
        pos = w * (y == k)[order]
        neg = w - pos
        if len(starts) < len(score):
            pos, neg = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        ranked = (pos * (np.cumsum(neg, axis=1) - 0.5 * neg)).sum(axis=1)
        aucs.append(np.where((n_pos > 0) & (n_neg > 0), ranked / (n_pos * n_neg), np.nan))
    aucs = np.stack(aucs, axis=1)
    defined = np.isfinite(aucs).sum(axis=1)
    return np.where(defined > 0, np.nansum(aucs, axis=1) / np.maximum(defined, 1), np.nan)


def _sample_log_loss(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy, clipped as head_metrics (1e-7) and then scikit-learn (dtype eps) clip it."""
    eps = np.finfo(proba.dtype).eps if np.issubdtype(proba.dtype, np.floating) else np.finfo(np.float64).eps
    picked = np.clip(np.clip(proba, 1e-7, 1), eps, 1 - eps)[np.arange(len(y)), y]
    return -np.log(picked).astype(np.float64)


def _sample_weighted_log_loss(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy as weighted_log_loss computes it (clip to 1e-15, renormalise)."""
    p = np.clip(proba, 1e-15, 1)
    p = p / p.sum(axis=1, keepdims=True)
    return -np.log(p[np.arange(len(y)), y]).astype(np.float64)


def _ece(y: np.ndarray, proba: np.ndarray, weights: np.ndarray, total: np.ndarray) -> np.ndarray:
    confidence = proba.max(axis=1).astype(np.float64)
    correct = (proba.argmax(axis=1) == y).astype(np.float64)
    index = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    in_bin = np.zeros((len(y), ECE_BINS))
    in_bin[np.arange(len(y)), index] = 1.0
    gap = weights @ (in_bin * correct[:, None]) - weights @ (in_bin * confidence[:, None])
    return np.abs(gap).sum(axis=1) / total


def _plain(value):
    """numpy scalars to Python, NaN/inf to None: the report goes to json.dump unchanged."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# --- names, tables, figures --------------------------------------------------------------------

def slug(name: str) -> str:
    """A metric-name part: 'Normal/Mild' -> 'normal_mild', 'L4/L5' -> 'l4_l5'."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def evaluation_metrics(report: Mapping[str, Any], split: str) -> dict[str, float]:
    """The MLflow metrics of a report: ``<split>_<head>_<metric>`` (the names training logs) with the suffixes
    ``_ci_low``, ``_ci_high``, ``_majority``, ``_prior``; per class ``<split>_<head>_<f1|precision|recall>_<class>``;
    breakdowns ``<split>_severity_<metric>_<condition or level>``; ``<split>_n_samples``, ``<split>_n_studies``.
    Undefined values are left out."""
    out: dict[str, float] = {f"{split}_n_samples": float(report["n_samples"]),
                             f"{split}_n_studies": float(report["n_studies"])}

    def add(name, entry):
        for suffix, key in (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"),
                            ("_majority", "majority"), ("_prior", "prior")):
            if entry.get(key) is not None:
                out[name + suffix] = float(entry[key])

    for head, result in report["heads"].items():
        for metric, entry in result.get("metrics", {}).items():
            add(f"{split}_{head}_{metric}", entry)
        for cls, scores in result.get("per_class", {}).items():
            for score in PER_CLASS_METRICS:
                add(f"{split}_{head}_{score}_{slug(cls)}", scores[score])
    for head, columns in report["breakdowns"].items():
        for groups in columns.values():
            for group, result in groups.items():
                for metric, entry in result["metrics"].items():
                    add(f"{split}_{head}_{metric}_{slug(group)}", entry)
    return out


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
              f"ECE: {report['ece_bins']} equal-width bins of the top-class probability. Lower is better for "
              f"{', '.join(LOWER_IS_BETTER)}. Sampling noise only adds to the ECE, so for a well-calibrated "
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
            better = "lower" if metric in LOWER_IS_BETTER else "higher"
            ax.set_title(f"{head} {metric.replace('_', ' ')} by {column} ({better} is better)", fontsize=9)
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --- MLflow ------------------------------------------------------------------------------------

def log_evaluation(report: Mapping[str, Any], split: str) -> None:
    """Log a report into the active run: :func:`evaluation_metrics`, ``evaluation/<split>.json``,
    ``evaluation/<split>.md``, ``evaluation/<split>_reliability_<head>.png`` and
    ``evaluation/<split>_breakdown_severity.png``."""
    if mlflow.active_run() is None:
        raise RuntimeError("log_evaluation needs an active MLflow run")
    if not re.fullmatch(r"[a-z0-9_]+", split):
        raise ValueError(f"split must be a plain name such as test, got {split!r}")
    mlflow.log_metrics(evaluation_metrics(report, split))
    mlflow.log_dict(dict(report), f"evaluation/{split}.json")
    mlflow.log_text(evaluation_markdown(report, split), f"evaluation/{split}.md")
    for head, result in report["heads"].items():
        if result["n_samples"]:
            log_figure(reliability_figure(report, head), f"evaluation/{split}_reliability_{head}.png")
    if report["breakdowns"].get("severity"):
        log_figure(breakdown_figure(report), f"evaluation/{split}_breakdown_severity.png")


def evaluate_run(run_id: str, split: str = "test", *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Evaluate the model a training run logged on one of its splits and log the result into that run.

    Rebuilds the run's data from its own ``config.yaml`` (the cache makes this fast), predicts the split with the
    logged model, and leaves the run's status and end time as they were. Returns the report.
    """
    # train imports this module to evaluate at the end of training; import it here to avoid the cycle.
    from spinemri.data.cache import PrepareError
    from spinemri.data.dicom import ImageReadError
    from spinemri.data.readers import DatasetError
    from spinemri.models.pyfunc import load_classifier
    from spinemri.training.train import prepare_data

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
    images_path = str(dataset.path / "images.npy")
    outputs: dict[str, list[np.ndarray]] = {head: [] for head in HEAD_CLASSES}
    for start in range(0, len(part), 256):
        # The batches training evaluated with, so the shared test_* metrics come out the same.
        predicted = classifier.predict_images(read_rows(images_path, part.rows[start:start + 256]),
                                              batch_size=config.train.batch_size)
        for head in HEAD_CLASSES:
            outputs[head].append(predicted[head])
    proba = {head: np.concatenate(values) for head, values in outputs.items()}
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
    # below, the next command puts that status back (spinemri.runs.reap_dead_runs).
    owner = run.data.tags.get(PROCESS_TAG)
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


__all__ = ["EvaluationError", "breakdown_figure", "evaluate_predictions", "evaluate_run", "evaluation_markdown",
           "evaluation_metrics", "log_evaluation", "reliability_figure", "resample_scores", "study_bootstrap_counts"]

"""Per-head metrics of a classifier's predictions, with study-level bootstrap CIs, baselines, calibration and
severity breakdowns: pure functions of labels and probabilities (no MLflow, no files).

Definitions (rows whose target is -1 are left out per head):

- ``accuracy``, ``loss``, ``roc_auc``, ``f1_macro``, ``precision_macro``, ``recall_macro`` and severity's
  ``weighted_log_loss`` are exactly :func:`head_metrics` / :func:`weighted_log_loss`, the numbers training logs as ``test_<head>_<metric>``.
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

from collections.abc import Mapping
import math
from typing import Any
import warnings

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from spinemri.data.schema import CONDITIONS, HEAD_CLASSES, LEVELS, SEVERITY_WEIGHTS

HEAD_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "precision_macro", "recall_macro", "loss")
SEVERITY_METRICS = (*HEAD_METRICS, "weighted_log_loss")
PER_CLASS_METRICS = ("f1", "precision", "recall")
BREAKDOWNS = ("condition", "level")  # sample-table columns the severity metrics are broken down by
ECE_BINS = 15
CONFIDENCE = 0.95
MIN_STUDIES_FOR_CI = 2  # one study resampled is always itself: a zero-width interval that would mislead
_BOOT_CELLS = 4_000_000  # resamples x rows per chunk: bounds the memory of the weight matrices (~32 MB each)

METRICS = ("accuracy", "loss", "roc_auc", "f1_macro", "precision_macro", "recall_macro")


def head_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """accuracy, loss (cross-entropy), roc_auc (macro one-vs-rest), f1/precision/recall (macro).

    Rows with y_true < 0 (unknown) are left out. ROC-AUC averages over the classes that have
    both positive and negative rows (NaN if none has); the macro scores average over the
    classes present in y_true or in the predictions.
    """
    keep = y_true >= 0
    y, p = y_true[keep], proba[keep]
    if len(y) == 0:
        return {name: float("nan") for name in METRICS}
    n_classes = p.shape[1]
    predicted = p.argmax(axis=1)
    aucs = [roc_auc_score(y == k, p[:, k]) for k in range(n_classes) if 0 < (y == k).sum() < len(y)]
    return {
        "accuracy": float(accuracy_score(y, predicted)),
        "loss": float(log_loss(y, np.clip(p, 1e-7, 1), labels=list(range(n_classes)))),
        "roc_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "f1_macro": float(f1_score(y, predicted, average="macro", zero_division=0)),
        "precision_macro": float(precision_score(y, predicted, average="macro", zero_division=0)),
        "recall_macro": float(recall_score(y, predicted, average="macro", zero_division=0)),
    }


def weighted_log_loss(severity: np.ndarray, proba: np.ndarray) -> float:
    """The competition's severity loss: log loss with sample weights 1/2/4 (Normal/Mild, Moderate, Severe)."""
    keep = severity >= 0
    y, p = severity[keep], np.clip(proba[keep], 1e-15, 1)
    if len(y) == 0:
        return float("nan")
    p = p / p.sum(axis=1, keepdims=True)
    weights = SEVERITY_WEIGHTS[y]
    return float(-(weights * np.log(p[np.arange(len(y)), y])).sum() / weights.sum())


def classification_text(y_true: np.ndarray, proba: np.ndarray, class_names) -> str:
    """scikit-learn's classification report of the labelled rows, as text."""
    keep = y_true >= 0
    return classification_report(y_true[keep], proba[keep].argmax(axis=1), labels=list(range(len(class_names))),
                                 target_names=list(class_names), zero_division=0)


def study_bootstrap_counts(study_ids, n_boot: int, seed: int = 0) -> np.ndarray:
    """How often each row is drawn in each resample of the studies: int64 (n_boot, len(study_ids)).

    Every resample draws as many studies as there are, with replacement; a row's count is its study's count,
    so the rows of one study always travel together.
    """
    per_study, codes = study_resamples(study_ids, n_boot, seed)
    return per_study[:, codes]


def study_resamples(study_ids, n_boot: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The draws behind :func:`study_bootstrap_counts`, per study: int64 (n_boot, studies), and each row's
    study (codes into its columns). ``per_study[rows][:, codes]`` is a block of resamples' row counts."""
    codes, studies = pd.factorize(pd.Series(study_ids), sort=True)
    n_studies = len(studies)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_studies, size=(n_boot, n_studies))
    offsets = (np.arange(n_boot) * n_studies)[:, None]
    per_study = np.bincount((draws + offsets).ravel(), minlength=n_boot * n_studies).reshape(n_boot, n_studies)
    return per_study, codes


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
    value = point_scores(head, y, proba)
    majority = point_scores(head, y, np.tile(np.eye(len(prior))[prior.argmax()], (len(y), 1)))
    baseline = point_scores(head, y, np.tile(prior, (len(y), 1)))
    boot = _bootstrap(y, proba, counts, severity)

    def entry(name, k=None):
        pick = (lambda d: d[name]) if k is None else (lambda d: d[f"{name}_per_class"][..., k])
        return {"value": float(pick(value)), **_interval(pick(boot)), "majority": float(pick(majority)),
                "prior": float(pick(baseline))}

    return {"metrics": {name: entry(name) for name in names},
            "per_class": {cls: {score: entry(score, k) for score in PER_CLASS_METRICS}
                          for k, cls in enumerate(HEAD_CLASSES[head])}}


def point_scores(head: str, y: np.ndarray, proba: np.ndarray) -> dict:
    """The scores of the rows as they are; the metrics training logs come from the same functions it uses."""
    scores = {k: v[0] for k, v in resample_scores(y, proba, np.ones((1, len(y))), severity=head == "severity").items()}
    with warnings.catch_warnings():
        # head_metrics clips to 1e-7, so a one-hot baseline no longer sums to one; the loss is still what we want
        warnings.filterwarnings("ignore", message="The y_prob values do not sum to one")
        scores.update(head_metrics(y, proba))
    if head == "severity":
        scores["weighted_log_loss"] = weighted_log_loss(y, proba)
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

"""Per-head metrics of a classifier's predictions, with study-level bootstrap CIs, baselines, calibration and
severity breakdowns: pure functions of labels and probabilities (no MLflow, no files).

Definitions (rows whose target is -1 are left out per head):

- Every metric is a function of :data:`spinemri.metrics.scores.REGISTRY` (defined there), the same function for
  the value, each resample of the interval and the numbers training logs as ``test_<head>_<metric>``.
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

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report

from spinemri.data.schema import CONDITIONS, HEAD_CLASSES, LEVELS
from spinemri.metrics import scores
from spinemri.metrics.scores import ECE_BINS, PER_CLASS_METRICS, resample_scores

BREAKDOWNS = ("condition", "level")  # sample-table columns the severity metrics are broken down by
CONFIDENCE = 0.95
MIN_STUDIES_FOR_CI = 2  # one study resampled is always itself: a zero-width interval that would mislead
_BOOT_CELLS = 4_000_000  # resamples x rows per chunk: bounds the memory of the weight matrices (~32 MB each)

METRICS = ("accuracy", "loss", "roc_auc", "f1_macro", "precision_macro", "recall_macro")  # per fold


def head_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """accuracy, loss (cross-entropy), roc_auc (macro one-vs-rest), f1/precision/recall (macro) of the rows with
    a label (y_true >= 0), by the registered metrics (spinemri.metrics.scores); NaN for every one without rows."""
    keep = y_true >= 0
    if not keep.any():
        return {name: float("nan") for name in METRICS}
    values = scores.point_scores(y_true[keep], proba[keep])
    return {name: values[name] for name in METRICS}


def weighted_log_loss(severity: np.ndarray, proba: np.ndarray) -> float:
    """The competition's severity loss: log loss with sample weights 1/2/4 (Normal/Mild, Moderate, Severe)."""
    keep = severity >= 0
    if not keep.any():
        return float("nan")
    return scores.point_scores(severity[keep], proba[keep], severity=True)["weighted_log_loss"]


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
    names = scores.headline_metrics(head)
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
    """The scores of the rows as they are: the registered metrics, the numbers training logs."""
    return scores.point_scores(y, proba, severity=head == "severity")


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

"""Every per-head metric, defined once: one function per metric, evaluated on many resamples of the rows at once.

A metric is a function of :class:`Resamples` (the labels, the probabilities and how many times each row is in
each resample) that returns one value per resample, or one per class. The same function gives the point
estimate (one resample: every row once) and the bootstrap (study resamples), so the number a run logs and the
centre of its interval cannot disagree. :data:`REGISTRY` maps each name to its :class:`Metric`; whether lower
is better comes from its name (spinemri.metrics.goals). A new metric is one function and one entry here.

Definitions (rows with a label only):

- ``accuracy``; ``balanced_accuracy``: the mean recall over the classes present in the labels.
- ``roc_auc``: the mean one-vs-rest AUC over the classes that have both positive and negative rows (ties
  count half), NaN if none has.
- ``f1_macro``/``precision_macro``/``recall_macro``: the mean over the classes present in the labels or the
  predictions; a class never predicted has precision 0.
- ``loss``: the cross-entropy, probabilities clipped to [1e-7, 1] (then to the dtype's eps); ``weighted_log_loss``
  (severity): the competition's, weights 1/2/4 for Normal/Mild, Moderate, Severe, probabilities clipped to 1e-15
  and renormalised.
- ``ece``: the expected calibration error of the top-class probability in 15 equal-width bins.
- ``<f1|precision|recall>_per_class``: per class, NaN where the class has no labelled row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from spinemri.data.schema import SEVERITY_WEIGHTS
from spinemri.metrics.goals import metric_goal

ECE_BINS = 15


class Resamples:
    """The rows of one head as many resamples: ``y`` int (n,) class indices >= 0, ``proba`` float (n, K) and
    ``weights`` (B, n), how many times each row is in each resample. What several metrics share (the
    confusion matrices) is computed once."""

    def __init__(self, y: np.ndarray, proba: np.ndarray, weights: np.ndarray):
        self.y, self.proba = np.asarray(y), np.asarray(proba)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.classes = self.proba.shape[1]
        self.predicted = self.proba.argmax(axis=1)

    @cached_property
    def confusion(self) -> np.ndarray:
        """(B, K, K) counts [resample, true, predicted]."""
        n, k = len(self.y), self.classes
        cells = np.zeros((n, k * k))
        cells[np.arange(n), self.y * k + self.predicted] = 1.0
        return (self.weights @ cells).reshape(-1, k, k)

    @cached_property
    def total(self) -> np.ndarray:
        return self.confusion.sum(axis=(1, 2))

    @cached_property
    def hits(self) -> np.ndarray:
        return np.diagonal(self.confusion, axis1=1, axis2=2)

    @cached_property
    def support(self) -> np.ndarray:
        return self.confusion.sum(axis=2)

    @cached_property
    def predicted_count(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @cached_property
    def present(self) -> np.ndarray:
        """Classes in the labels or the predictions of each resample."""
        return (self.support > 0) | (self.predicted_count > 0)

    def macro(self, per_class: np.ndarray) -> np.ndarray:
        """The mean over the present classes (NaN where none is)."""
        n_present = self.present.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(n_present > 0,
                            np.where(self.present, np.nan_to_num(per_class), 0).sum(axis=1) / n_present, np.nan)


def _recall(r: Resamples) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r.support > 0, r.hits / r.support, np.nan)


def _precision(r: Resamples) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r.predicted_count > 0, r.hits / r.predicted_count, 0.0)


def _f1(r: Resamples) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r.present, 2 * r.hits / (r.support + r.predicted_count), np.nan)


def accuracy(r: Resamples) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return r.hits.sum(axis=1) / r.total


def balanced_accuracy(r: Resamples) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nansum(_recall(r), axis=1) / (r.support > 0).sum(axis=1)


def roc_auc(r: Resamples) -> np.ndarray:
    """A resampled AUC is the Mann-Whitney statistic with each row counted ``weight`` times (ties count half),
    what roc_auc_score gives on the resample written out row by row."""
    aucs = []
    for k in range(r.classes):
        score = r.proba[:, k]
        order = np.argsort(score, kind="stable")
        sorted_score = score[order]
        starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])  # groups of tied scores
        w = r.weights[:, order]
        pos = w * (r.y == k)[order]
        neg = w - pos
        if len(starts) < len(score):
            pos, neg = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        ranked = (pos * (np.cumsum(neg, axis=1) - 0.5 * neg)).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            aucs.append(np.where((n_pos > 0) & (n_neg > 0), ranked / (n_pos * n_neg), np.nan))
    aucs = np.stack(aucs, axis=1)
    defined = np.isfinite(aucs).sum(axis=1)
    return np.where(defined > 0, np.nansum(aucs, axis=1) / np.maximum(defined, 1), np.nan)


def f1_macro(r: Resamples) -> np.ndarray:
    return r.macro(_f1(r))


def precision_macro(r: Resamples) -> np.ndarray:
    return r.macro(_precision(r))


def recall_macro(r: Resamples) -> np.ndarray:
    return r.macro(_recall(r))


def loss(r: Resamples) -> np.ndarray:
    proba = r.proba
    eps = np.finfo(proba.dtype).eps if np.issubdtype(proba.dtype, np.floating) else np.finfo(np.float64).eps
    picked = np.clip(np.clip(proba, 1e-7, 1), eps, 1 - eps)[np.arange(len(r.y)), r.y]
    with np.errstate(divide="ignore", invalid="ignore"):
        return r.weights @ -np.log(picked).astype(np.float64) / r.total


def weighted_log_loss(r: Resamples) -> np.ndarray:
    p = np.clip(r.proba, 1e-15, 1)
    p = p / p.sum(axis=1, keepdims=True)
    per_row = -np.log(p[np.arange(len(r.y)), r.y]).astype(np.float64)
    sample_weight = SEVERITY_WEIGHTS[r.y].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return r.weights @ (sample_weight * per_row) / (r.weights @ sample_weight)


def ece(r: Resamples) -> np.ndarray:
    confidence = r.proba.max(axis=1).astype(np.float64)
    correct = (r.predicted == r.y).astype(np.float64)
    index = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    in_bin = np.zeros((len(r.y), ECE_BINS))
    in_bin[np.arange(len(r.y)), index] = 1.0
    gap = r.weights @ (in_bin * correct[:, None]) - r.weights @ (in_bin * confidence[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(gap).sum(axis=1) / r.total


def f1_per_class(r: Resamples) -> np.ndarray:
    return np.where(r.support > 0, _f1(r), np.nan)


def precision_per_class(r: Resamples) -> np.ndarray:
    return np.where(r.support > 0, _precision(r), np.nan)


def recall_per_class(r: Resamples) -> np.ndarray:
    return _recall(r)


@dataclass(frozen=True)
class Metric:
    """One registered metric: its function of :class:`Resamples`, whether it is per class, and whether only the
    severity head has it."""

    name: str
    compute: Callable[[Resamples], np.ndarray]
    per_class: bool = False
    severity_only: bool = False

    @property
    def goal(self) -> str:
        """``minimize`` or ``maximize`` (spinemri.metrics.goals, from the name)."""
        return metric_goal(self.name)

    def applies_to(self, head: str) -> bool:
        return not self.severity_only or head == "severity"


REGISTRY: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", accuracy),
    Metric("balanced_accuracy", balanced_accuracy),
    Metric("roc_auc", roc_auc),
    Metric("f1_macro", f1_macro),
    Metric("precision_macro", precision_macro),
    Metric("recall_macro", recall_macro),
    Metric("loss", loss),
    Metric("weighted_log_loss", weighted_log_loss, severity_only=True),
    Metric("ece", ece),
    Metric("f1_per_class", f1_per_class, per_class=True),
    Metric("precision_per_class", precision_per_class, per_class=True),
    Metric("recall_per_class", recall_per_class, per_class=True),
)}

# The views every other module reads: the headline metrics of a head, with severity's own; those a paired
# bootstrap can recompute; the per-class scores of a report.
HEAD_METRICS = tuple(n for n, m in REGISTRY.items() if not m.per_class and not m.severity_only and n != "ece")
SEVERITY_METRICS = (*HEAD_METRICS, "weighted_log_loss")
PAIRED_METRICS = tuple(n for n, m in REGISTRY.items() if not m.per_class)
PER_CLASS_METRICS = tuple(n.removesuffix("_per_class") for n, m in REGISTRY.items() if m.per_class)


def headline_metrics(head: str) -> tuple[str, ...]:
    """The registered metrics a report gives ``head`` one value and interval each (the per-class ones aside)."""
    return tuple(n for n, m in REGISTRY.items() if not m.per_class and m.applies_to(head))


def pairable(head: str, name: str) -> bool:
    """Whether a paired bootstrap can recompute ``test_<head>_<name>`` from two models' predictions."""
    metric = REGISTRY.get(name)
    return metric is not None and not metric.per_class and metric.applies_to(head)


def resample_scores(y: np.ndarray, proba: np.ndarray, weights: np.ndarray, *, severity: bool = False
                    ) -> dict[str, np.ndarray]:
    """Every registered metric of one head for many resamples at once: float64 (B,) per metric, (B, K) for the
    per-class ones; NaN where undefined for a resample. ``severity``: the severity head's own metrics too."""
    head = "severity" if severity else "other"
    r = Resamples(y, proba, weights)
    return {name: metric.compute(r) for name, metric in REGISTRY.items() if metric.applies_to(head)}


def point_scores(y: np.ndarray, proba: np.ndarray, *, severity: bool = False) -> dict[str, np.ndarray | float]:
    """The registered metrics of the rows as they are (one resample, every row once): a float per metric, an
    array (K,) per per-class score."""
    scores = resample_scores(y, proba, np.ones((1, len(y))), severity=severity)
    return {name: (values[0] if REGISTRY[name].per_class else float(values[0])) for name, values in scores.items()}

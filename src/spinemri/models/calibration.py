"""Temperature scaling: one temperature per head, and per condition for severity.

A network trained with cross-entropy is often over- or under-confident; the competition's log
loss punishes both. Temperature scaling divides the log-probabilities by one number ``T`` and
renormalises, ``p_T ∝ p^(1/T)`` (the softmax of the logits over ``T``): the ranking of classes in a
row never changes, so accuracy does not, only how sure the model says it is. ``T`` is the value
that minimises the head's own training loss on *held-out* predictions — the validation split of a
single-split run, the other folds' out-of-fold predictions in cross-validation — never the test
split. Severity gets a temperature per condition (a spinal canal grade and a foraminal grade need
not be equally over-confident), falling back to the head's when a condition has fewer than
:data:`MIN_ROWS` labelled rows.

A few held-out rows that the model gets all right would drive ``T`` toward 0 — infinitely sure —
and the first crop a localizer places a little off would then cost a huge loss. So ``T`` is the
maximum a posteriori value under a log-normal prior centred on 1 (``log T ~ N(0, PRIOR_SD²)``):
with a handful of rows it stays near 1, with thousands the data decide; and it stays within
:data:`BOUNDS`.

The temperatures travel in the model's ``meta.json`` (``temperature``) and the served pyfunc and
``predict-study`` apply them (:meth:`Temperatures.apply`) to every prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from spinemri.data.schema import CONDITIONS, SEVERITY_WEIGHTS

BOUNDS = (0.25, 8.0)  # a temperature outside this range means the held-out predictions are degenerate
MIN_ROWS = 50
TABLE_ARTIFACT = "calibration/temperatures.json"  # a run's fitted temperatures (an MLflow table)
PRIOR_SD = 0.5  # of log T: a factor e^±1 at two standard deviations
_EPS = 1e-12


def scale(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``proba`` (N, K) with its log-probabilities divided by ``temperature``, rows summing to 1."""
    logits = np.log(np.clip(np.asarray(proba, dtype=np.float64), _EPS, 1.0)) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def fit_temperature(y: np.ndarray, proba: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The temperature that minimises the (weighted) log loss of ``proba`` against ``y`` (class indices) under
    the prior on ``log T`` (see the module docstring); 1.0 when there is nothing to fit (no rows)."""
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    log_p = np.log(np.clip(np.asarray(proba, dtype=np.float64), _EPS, 1.0))

    rows = len(y)

    def loss(log_t: float) -> float:  # the mean (weighted) log loss plus the prior's share per row
        z = log_p / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        row = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
        return float((w * row).sum() / w.sum()) + log_t ** 2 / (2 * PRIOR_SD ** 2 * rows)

    found = minimize_scalar(loss, bounds=tuple(np.log(BOUNDS)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


@dataclass(frozen=True)
class Temperatures:
    """Per head its temperature, and per condition the severity head's."""

    heads: Mapping[str, float]
    severity_by_condition: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"heads": dict(self.heads), "severity_by_condition": dict(self.severity_by_condition)}

    @classmethod
    def from_dict(cls, raw: Mapping) -> "Temperatures":
        return cls(heads={k: float(v) for k, v in raw["heads"].items()},
                   severity_by_condition={k: float(v) for k, v in raw.get("severity_by_condition", {}).items()})

    def table(self) -> pd.DataFrame:
        """One row per temperature (head, condition: '' for the head's own), as runs log them (TABLE_ARTIFACT)."""
        rows = [{"head": head, "condition": "", "temperature": t} for head, t in self.heads.items()]
        rows += [{"head": "severity", "condition": c, "temperature": t} for c, t in self.severity_by_condition.items()]
        return pd.DataFrame(rows, columns=["head", "condition", "temperature"])

    def apply(self, proba: Mapping[str, np.ndarray], conditions: Sequence | None = None) -> dict[str, np.ndarray]:
        """Scaled probabilities per head. ``conditions`` (one per row, or None): the condition each
        severity row grades; rows of an unknown or missing condition get the head's temperature."""
        out = {head: scale(p, self.heads.get(head, 1.0)) for head, p in proba.items()}
        if "severity" in proba and conditions is not None and self.severity_by_condition:
            raw = np.asarray(proba["severity"])
            if len(conditions) != len(raw):
                raise ValueError(f"{len(conditions)} conditions for {len(raw)} severity rows")
            conditions = np.asarray([str(c) for c in conditions], dtype=object)
            for condition, t in self.severity_by_condition.items():
                rows = conditions == condition
                if rows.any():
                    out["severity"][rows] = scale(raw[rows], t)
        return out


def fit(targets: Mapping[str, np.ndarray], proba: Mapping[str, np.ndarray], conditions: Sequence | None = None,
        *, severity_weights: bool = True) -> Temperatures:
    """Temperatures fitted on held-out predictions: per head on its labelled rows (severity weighted
    1/2/4 when the model was trained so), and per condition of ``conditions`` for severity."""
    heads, by_condition = {}, {}
    for head, y_all in targets.items():
        y_all = np.asarray(y_all)
        keep = y_all >= 0
        y, p = y_all[keep], np.asarray(proba[head])[keep]
        weights = SEVERITY_WEIGHTS[y].astype(np.float64) if head == "severity" and severity_weights else None
        heads[head] = fit_temperature(y, p, weights)
        if head == "severity" and conditions is not None:
            kept = np.asarray([str(c) for c in conditions], dtype=object)[keep]
            for condition in CONDITIONS:
                rows = kept == condition
                if rows.sum() >= MIN_ROWS:
                    by_condition[condition] = fit_temperature(y[rows], p[rows],
                                                              None if weights is None else weights[rows])
    return Temperatures(heads=heads, severity_by_condition=by_condition)


def cross_fitted(targets: Mapping[str, np.ndarray], proba: Mapping[str, np.ndarray], conditions: Sequence,
                 studies: Sequence, folds: Sequence, *, fitted_rows: np.ndarray | None = None,
                 severity_weights: bool = True) -> dict[str, np.ndarray]:
    """Out-of-fold probabilities calibrated without fitting any row's temperature on that row's study.

    Fold models differ in how over- or under-confident they are, so one fold's temperatures do not
    carry to another's predictions. Each fold's studies are halved instead (alternate study ids), and
    each half is scaled by the temperatures fitted on the other half. ``fitted_rows`` (boolean) limits
    fitting and scaling to those rows (e.g. the rows a model graded, not the prior); the rest stay as
    they are.
    """
    conditions = np.asarray([str(c) for c in conditions], dtype=object)
    study, fold = np.asarray([str(s) for s in studies]), np.asarray(folds)
    rows = np.ones(len(study), bool) if fitted_rows is None else np.asarray(fitted_rows, bool)
    out = {h: np.array(p, dtype=np.float64, copy=True) for h, p in proba.items()}
    for k in np.unique(fold):
        mine = fold == k
        half = np.isin(study, np.unique(study[mine])[::2])
        for fit_on, apply_to in ((mine & ~half & rows, mine & half & rows), (mine & half & rows, mine & ~half & rows)):
            if not apply_to.any() or not any((np.asarray(t)[fit_on] >= 0).any() for t in targets.values()):
                continue
            fitted = fit({h: np.asarray(t)[fit_on] for h, t in targets.items()},
                         {h: np.asarray(p)[fit_on] for h, p in proba.items()}, list(conditions[fit_on]),
                         severity_weights=severity_weights)
            scaled = fitted.apply({h: np.asarray(p)[apply_to] for h, p in proba.items()}, list(conditions[apply_to]))
            for h in out:
                out[h][apply_to] = scaled[h]
    return out

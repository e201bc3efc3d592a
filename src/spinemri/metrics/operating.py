"""Referral operating points: a threshold on a calibrated severity probability that decides whether a finding
is referred, chosen on rows the model was tuned on (validation or out-of-fold) to reach a target
sensitivity, and what it does on held-out rows — sensitivity, specificity, PPV, NPV and the referral rate,
each with a 95 % bootstrap interval over studies.

    <condition>                      a site of that condition is referable when moderate or severe; its score
                                     is P(moderate) + P(severe)
    severe_spinal_canal_stenosis     a spinal canal site is referable when severe; its score is P(severe)
    any_moderate_or_severe           a level of a study is referable when any of its sites is moderate or
                                     severe; its score is the highest P(moderate) + P(severe) among them

The threshold never sees the rows it is judged on: :func:`fit_thresholds` takes the fitting rows only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import math

import numpy as np
import pandas as pd

from spinemri.data.schema import (ANY_LEVEL, CONDITIONS, REFERRAL_POINTS, SEVERE_SPINAL, SEVERITY_INDEX,
    parse_label_column)
from spinemri.metrics.competition import label_rows, submission_probabilities
from spinemri.metrics.paired import score_intervals

MODERATE, SEVERE = SEVERITY_INDEX["Moderate"], SEVERITY_INDEX["Severe"]
POINTS = REFERRAL_POINTS
RATES: tuple[str, ...] = ("sensitivity", "specificity", "ppv", "npv", "referral_rate")
ARTIFACT = "clinical/operating_points.json"  # the thresholds, as the logged model carries them


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold on a point's score (refer at or above it), the sensitivity it was chosen for and what it
    reached on its fitting rows (``fitted_on`` of them, ``events`` referable)."""

    name: str
    threshold: float
    target: float
    fitted_sensitivity: float
    fitted_on: int
    events: int

    def to_dict(self) -> dict:
        """As JSON: a threshold or sensitivity that could not be fitted (no referable case) is null."""
        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {"threshold": finite(self.threshold), "target": self.target,
                "fitted_sensitivity": finite(self.fitted_sensitivity), "fitted_on": self.fitted_on,
                "events": self.events}

    @classmethod
    def from_dict(cls, name: str, entry: Mapping) -> "OperatingPoint":
        """A point as :meth:`to_dict` wrote it (a model's ``meta.json`` ``operating_points``)."""
        def number(key: str) -> float:
            return math.nan if entry.get(key) is None else float(entry[key])

        return cls(name, number("threshold"), float(entry["target"]), number("fitted_sensitivity"),
                   int(entry.get("fitted_on", 0)), int(entry.get("events", 0)))


def cases(point: str, samples: pd.DataFrame, severity: np.ndarray, proba: np.ndarray) -> pd.DataFrame:
    """The cases a point judges, one row each: ``study_id``, ``event`` (referable by the reference standard)
    and ``score``. ``samples`` has study_id, condition and level per row; ``severity`` the true grade index
    (-1: unlabelled, left out); ``proba`` the (n, 3) severity probabilities."""
    severity = np.asarray(severity)
    proba = np.asarray(proba, dtype=np.float64)
    frame = pd.DataFrame({"study_id": samples["study_id"].astype(str).to_numpy(),
                          "condition": samples["condition"].to_numpy(), "level": samples["level"].to_numpy(),
                          "fold": samples["fold"].to_numpy() if "fold" in samples else np.zeros(len(samples), int),
                          "grade": severity, "p_severe": proba[:, SEVERE],
                          "score": proba[:, MODERATE] + proba[:, SEVERE]})
    frame = frame[frame["grade"] >= 0].assign(event=lambda f: f["grade"] >= MODERATE)
    columns = ["study_id", "event", "score", "fold"]  # fold: a cross-validation's (a study is in one), else 0
    if point == ANY_LEVEL:
        grouped = frame.groupby(["study_id", "level"], sort=True).agg(event=("event", "any"), score=("score", "max"),
                                                                       fold=("fold", "first"))
        return grouped.reset_index()[columns]
    if point == SEVERE_SPINAL:
        spinal = frame[frame["condition"] == "spinal_canal_stenosis"]
        return spinal.assign(event=spinal["grade"] == SEVERE, score=spinal["p_severe"])[columns].reset_index(drop=True)
    if point not in CONDITIONS:
        raise ValueError(f"unknown operating point {point!r}; the points are {', '.join(POINTS)}")
    return frame[frame["condition"] == point][columns].reset_index(drop=True)


def submission_rows(labels: pd.DataFrame, submission: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """A study-level submission's labelled rows as :func:`cases` takes them: the samples (study_id, condition,
    level), the true grade index and the (n, 3) probabilities. ``labels``: train.csv's layout (or row_id,severity)."""
    rows = label_rows(labels)
    rows = rows[rows["severity"].notna()].reset_index(drop=True)
    proba = submission_probabilities(rows, submission)
    sites = [parse_label_column(r.split("_", 1)[1]) for r in rows["row_id"]]
    samples = pd.DataFrame({"study_id": rows["study_id"], "condition": [c for c, _ in sites],
                            "level": [lv for _, lv in sites]})
    return samples, rows["severity"].to_numpy(np.int64), proba


def fit_threshold(judged: pd.DataFrame, target: float) -> tuple[float, float]:
    """The threshold for ``target`` on ``judged`` (:func:`cases`) and the sensitivity it reaches there; (nan, nan)
    without a referable case.

    Of the n referable scores it is the k-th lowest, k = floor((1 - target)(n + 1)): the highest threshold at
    which a new referable case like these is referred with probability at least ``target`` (a split-conformal
    quantile), so on other rows the sensitivity lands on the target rather than below it, as the plain
    quantile's does. With fewer than :func:`certifying_events` referable cases (k = 0) no threshold can promise
    the target from the cases alone; then it is the lower prediction bound of a new referable score, assuming
    the logits of the referable scores normal (Student's t with n - 1 degrees of freedom), and no higher than
    the lowest referable score; with one referable case, that case's score."""
    if not 0 < target <= 1:
        raise ValueError(f"a target sensitivity must be in (0, 1], got {target}")
    scores = np.sort(judged.loc[judged["event"].astype(bool), "score"].to_numpy(np.float64))
    threshold = _threshold_of(scores, target)
    return threshold, (float(np.mean(scores >= threshold)) if len(scores) else math.nan)


LOGIT_CLIP = 1e-7  # scores of exactly 0 or 1 (saturated probabilities) have no logit: clipped this far in


def _threshold_of(ascending: np.ndarray, target: float) -> float:
    """:func:`fit_threshold`'s threshold from the referable scores sorted ascending; NaN for none."""
    n = len(ascending)
    if n == 0:
        return math.nan
    k = math.floor((1 - target) * (n + 1) + 1e-9)
    if k >= 1:
        return float(ascending[k - 1])
    if n == 1 or target >= 1:
        return float(ascending[0])
    from scipy.stats import t as student

    p = np.clip(ascending, LOGIT_CLIP, 1 - LOGIT_CLIP)
    logits = np.log(p / (1 - p))
    bound = logits.mean() - student.ppf(target, n - 1) * logits.std(ddof=1) * math.sqrt(1 + 1 / n)
    return float(min(ascending[0], 1 / (1 + math.exp(-bound))))


def certifying_events(target: float) -> float:
    """The fewest referable cases on which :func:`fit_threshold` can promise ``target`` from the cases alone:
    n with floor((1 - target)(n + 1)) >= 1 (9 for 0.90, 19 for 0.95)."""
    return max(1, math.ceil(1 / (1 - target) - 1 - 1e-9)) if target < 1 else math.inf


def fit_thresholds(samples: pd.DataFrame, severity: np.ndarray, proba: np.ndarray,
                   targets: Mapping[str, float]) -> dict[str, OperatingPoint]:
    """Every point's threshold, fitted on these rows (validation or out-of-fold, never test) for its target
    sensitivity (``targets``: point -> sensitivity, the setting clinical.sensitivity)."""
    points = {}
    for name in POINTS:
        judged = cases(name, samples, severity, proba)
        threshold, reached = fit_threshold(judged, targets[name])
        points[name] = OperatingPoint(name, threshold, float(targets[name]), reached, len(judged),
                                      int(judged["event"].sum()))
    return points


def rates(judged: pd.DataFrame, threshold: float, *, resamples: int = 1000, seed: int = 0
          ) -> dict[str, tuple[float, float, float]]:
    """What ``threshold`` does on ``judged`` (:func:`cases`): each of :data:`RATES` as (value, ci_low, ci_high),
    the interval a 95 % bootstrap over studies; NaN where a rate has no denominator (no referable case, ...)."""
    if not math.isfinite(threshold):
        return {name: (math.nan, math.nan, math.nan) for name in RATES}
    return rates_of(judged, judged["score"].to_numpy(np.float64) >= threshold, resamples=resamples, seed=seed)


def rates_of(judged: pd.DataFrame, flag: np.ndarray, *, resamples: int = 1000, seed: int = 0
             ) -> dict[str, tuple[float, float, float]]:
    """:func:`rates` of given flags, one per case (cross-fitted ones: each fold's by the others' threshold)."""
    if judged.empty:
        return {name: (math.nan, math.nan, math.nan) for name in RATES}
    flag = np.asarray(flag, bool)
    event = judged["event"].to_numpy(bool)
    counts = pd.DataFrame({
        "study_id": judged["study_id"].to_numpy(),
        "sensitivity:sum": flag & event, "sensitivity:weight": event,
        "specificity:sum": ~flag & ~event, "specificity:weight": ~event,
        "ppv:sum": flag & event, "ppv:weight": flag,
        "npv:sum": ~flag & ~event, "npv:weight": ~flag,
        "referral_rate:sum": flag, "referral_rate:weight": np.ones(len(flag), bool),
    }).groupby("study_id", sort=True).sum().astype(np.float64).reset_index()
    found = score_intervals(counts, resamples=resamples, seed=seed)
    return {name: found[name] for name in RATES}


def evaluate(points: Mapping[str, OperatingPoint], samples: pd.DataFrame, severity: np.ndarray,
             proba: np.ndarray, floor_points: Mapping[str, OperatingPoint], floor_proba: np.ndarray,
             *, resamples: int = 1000) -> pd.DataFrame:
    """The table of every point on held-out rows: one row per point and rate with the model's value and CI,
    and the floor's (the per-site prior, with its own thresholds fitted the same way) beside it."""
    rows = []
    for name, point in points.items():
        model = rates(cases(name, samples, severity, proba), point.threshold, resamples=resamples)
        floor = rates(cases(name, samples, severity, floor_proba), floor_points[name].threshold, resamples=resamples)
        rows += _rows(point, floor_points[name], model, floor)
    return pd.DataFrame(rows)


def evaluate_cross_fitted(points: Mapping[str, OperatingPoint], samples: pd.DataFrame, severity: np.ndarray,
                          proba: np.ndarray, floor_points: Mapping[str, OperatingPoint], floor_proba: np.ndarray,
                          *, resamples: int = 1000) -> pd.DataFrame:
    """:func:`evaluate` on out-of-fold rows (``samples["fold"]``) that the thresholds were also fitted on,
    cross-fitted within each fold: a study's cases are flagged by the threshold fitted on the other studies of
    its fold, scored by the same fold model — as a single split's test rows are judged by the threshold its
    validation rows chose. No case is judged by a threshold it helped choose, nor by one fitted on another
    model's scores (a fold model's probabilities need not sit where another's do). ``points`` (fitted on every
    fold: what a model carries) give the table's thresholds and targets."""
    rows = []
    for name, point in points.items():
        judged = [cases(name, samples, severity, p) for p in (proba, floor_proba)]
        model, floor = (rates_of(j, _left_out_flags(j, point.target), resamples=resamples) for j in judged)
        rows += _rows(point, floor_points[name], model, floor)
    return pd.DataFrame(rows)


def _left_out_flags(judged: pd.DataFrame, target: float) -> np.ndarray:
    """Each case flagged by the threshold (:func:`fit_threshold`) fitted on the other studies of its fold."""
    score, event = judged["score"].to_numpy(np.float64), judged["event"].to_numpy(bool)
    fold = judged["fold"].to_numpy()
    study = pd.factorize(judged["study_id"])[0]  # whole numbers: one comparison per case, not per string
    by_study = pd.Series(np.arange(len(judged))).groupby(study).indices
    flag = np.zeros(len(judged), bool)
    for k in np.unique(fold):
        referable = np.flatnonzero((fold == k) & event)
        referable = referable[np.argsort(score[referable], kind="stable")]
        for one in np.unique(study[fold == k]):
            threshold = _threshold_of(score[referable][study[referable] != one], target)
            held = by_study[one]  # a study is in one fold
            flag[held] = score[held] >= threshold  # NaN: nothing flagged
    return flag


def _rows(point: OperatingPoint, floor_point: OperatingPoint, model: Mapping, floor: Mapping) -> list[dict]:
    return [{"point": point.name, "rate": rate, "target": point.target, "threshold": point.threshold,
             "value": model[rate][0], "ci_low": model[rate][1], "ci_high": model[rate][2],
             "floor": floor[rate][0], "floor_ci_low": floor[rate][1], "floor_ci_high": floor[rate][2],
             "floor_threshold": floor_point.threshold} for rate in RATES]


def refer(points: Mapping[str, Mapping], conditions, proba: np.ndarray) -> np.ndarray:
    """The served flag per row: P(moderate) + P(severe) at or above the threshold of the row's condition, or,
    at a spinal canal site, P(severe) at or above the severe point's. ``points``: name -> {"threshold": ...}
    (:data:`ARTIFACT`); a row of a condition without a finite threshold is never referred."""
    def threshold(name) -> float:
        value = (points.get(name) or {}).get("threshold") if isinstance(name, str) else None
        return math.nan if value is None else float(value)

    proba = np.asarray(proba, dtype=np.float64)
    score = proba[:, MODERATE] + proba[:, SEVERE]
    out = np.zeros(len(proba), dtype=bool)
    for i, condition in enumerate(conditions):
        out[i] = bool(score[i] >= threshold(condition))  # NaN compares False: never referred
        if condition == "spinal_canal_stenosis":
            out[i] |= bool(proba[i, SEVERE] >= threshold(SEVERE_SPINAL))
    return out

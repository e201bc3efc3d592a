"""Paired comparisons: is model A better than model B on the same studies, or only on these studies?

Two models evaluated on one held-out set share its luck: a hard study is hard for both. Resampling
the studies *once* and scoring both models on every resample keeps that pairing, so the interval of
the difference is much narrower than the two separate intervals suggest — and it is the honest
question for a champion decision. This module does that for the classifier's per-head metrics
(``test_<head>_<metric>`` of :func:`spinemri.metrics.heads.resample_scores`) from the per-row test
predictions every training run logs as :data:`PREDICTIONS_ARTIFACT`.

Metrics that are a mean of ratios of per-study sums — the competition score (its four terms,
:func:`spinemri.metrics.competition.score_terms`) and the localizers' mean point error — are
paired from a table of those sums, one row per study, logged as :func:`terms_artifact`.

The bootstrap draws studies, not rows (:func:`~spinemri.metrics.heads.study_bootstrap_counts`):
the rows of one study travel together, as they do in every interval spinemri reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from spinemri.data.schema import HEAD_CLASSES
from spinemri.metrics.goals import lower_is_better
from spinemri.metrics.heads import study_resamples
from spinemri.metrics.scores import PAIRED_METRICS, pairable, resample_scores

PREDICTIONS_ARTIFACT = "evaluation/test_predictions.csv"
KEY_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level")
PAIRED_RESAMPLES = 2000
RESAMPLES_AT_ONCE = 100  # rows x this many int64 counts in memory at a time (40 MB at 50,000 rows)
# Below this many studies a bootstrap interval is not a 95 % interval: 1 study gives a zero-width one,
# and 2-4 studies better by chance all look "significant" about as often as a coin says so.
MIN_PAIRED_STUDIES = 5
@dataclass(frozen=True)
class PairedDifference:
    """``candidate`` − ``reference`` on ``metric`` over the same ``studies``, with its 95 % bootstrap interval."""

    metric: str
    candidate: float
    reference: float
    difference: float
    ci_low: float
    ci_high: float
    studies: int
    resamples: int

    @property
    def enough_studies(self) -> bool:
        return self.studies >= MIN_PAIRED_STUDIES

    @property
    def significant(self) -> bool:
        """Enough studies, and the 95 % interval of the difference excludes zero on the better side."""
        if not self.enough_studies:
            return False
        return self.ci_high < 0 if lower_is_better(self.metric) else self.ci_low > 0

    def describe(self) -> str:
        return (f"{self.metric} {self.candidate:.4f} vs {self.reference:.4f}: difference {self.difference:+.4f}, "
                f"95% CI [{self.ci_low:+.4f}, {self.ci_high:+.4f}] over {self.studies} studies "
                f"(paired bootstrap, {self.resamples} resamples; "
                f"{'lower' if lower_is_better(self.metric) else 'higher'} wins)")

    def tags(self) -> dict[str, str]:
        return {"paired_difference": repr(self.difference), "paired_ci_low": repr(self.ci_low),
                "paired_ci_high": repr(self.ci_high), "paired_studies": str(self.studies)}


def terms_artifact(metric: str) -> str:
    """Where a run logs the per-study terms of ``metric`` (for metrics that are not per-head)."""
    return f"evaluation/{metric}.terms.csv"


def head_metric(metric: str) -> tuple[str, str] | None:
    """``test_severity_weighted_log_loss`` -> ("severity", "weighted_log_loss"); None for a metric a paired
    bootstrap cannot recompute (per-condition breakdowns, timings, baselines)."""
    if not metric.startswith("test_"):
        return None
    head, _, name = metric[len("test_"):].partition("_")
    if head not in HEAD_CLASSES or not pairable(head, name):
        return None
    return head, name


def prediction_table(samples: pd.DataFrame, targets: dict[str, np.ndarray], proba: dict[str, np.ndarray]
                     ) -> pd.DataFrame:
    """One row per evaluated sample: its key, and per head the target (-1 = unknown) and the probabilities."""
    table = samples[[c for c in KEY_COLUMNS if c in samples.columns]].reset_index(drop=True).copy()
    for head, classes in HEAD_CLASSES.items():
        if head not in targets:
            continue
        table[f"{head}:target"] = np.asarray(targets[head], dtype=np.int64)
        for k, name in enumerate(classes):
            table[f"{head}:{name}"] = np.asarray(proba[head], dtype=np.float64)[:, k]
    return table


def paired_difference(candidate: pd.DataFrame, reference: pd.DataFrame, metric: str, *,
                      resamples: int = PAIRED_RESAMPLES, seed: int = 0) -> PairedDifference:
    """The paired bootstrap of ``metric`` between two models' evidence on the same studies: their
    :func:`prediction_table` s for a per-head metric, else their per-study terms (``study_id`` and
    ``<term>:sum`` / ``<term>:weight`` columns; the metric is the mean over terms of the sums' ratio).

    Raises ValueError when the metric cannot be paired or the tables are not of the same studies or samples.
    """
    parsed = head_metric(metric)
    if parsed is None:
        if any(str(c).endswith(":sum") for c in candidate.columns):
            return _terms_difference(candidate, reference, metric, resamples, seed)
        raise ValueError(f"{metric} cannot be compared by a paired bootstrap; pairable: test_<head>_<metric> "
                         f"with <metric> one of {', '.join(PAIRED_METRICS)}, or a metric logged with its "
                         "per-study terms")
    head, name = parsed
    columns = [f"{head}:{c}" for c in HEAD_CLASSES[head]]
    target = f"{head}:target"
    aligned = []
    for which, table in (("candidate", candidate), ("reference", reference)):
        missing = [c for c in ("study_id", target, *columns) if c not in table.columns]
        if missing:
            raise ValueError(f"the {which}'s predictions have no column {', '.join(missing)}")
        keys = [c for c in KEY_COLUMNS if c in table.columns]
        labelled = table[table[target] >= 0]
        aligned.append(labelled.astype({k: str for k in keys}).sort_values([*keys, target], kind="stable")
                       .reset_index(drop=True))
    ours, theirs = aligned
    keys = [c for c in KEY_COLUMNS if c in ours.columns and c in theirs.columns]
    if len(ours) != len(theirs) or not ours[[*keys, target]].equals(theirs[[*keys, target]]):
        raise ValueError(f"the two models were not evaluated on the same labelled samples ({len(ours)} vs "
                         f"{len(theirs)} {head} rows)")
    if ours.empty:
        raise ValueError(f"no labelled {head} rows to compare")
    y = ours[target].to_numpy(np.int64)
    p_ours, p_theirs = ours[columns].to_numpy(np.float64), theirs[columns].to_numpy(np.float64)
    severity = name == "weighted_log_loss"

    def both(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (resample_scores(y, p_ours, counts, severity=severity)[name],
                resample_scores(y, p_theirs, counts, severity=severity)[name])

    per_study, codes = study_resamples(ours["study_id"].to_numpy(), resamples, seed)
    blocks = [both(np.ones((1, len(ours)), np.int64))]
    blocks += [both(per_study[start:start + RESAMPLES_AT_ONCE][:, codes])
               for start in range(0, resamples, RESAMPLES_AT_ONCE)]
    a, b = (np.concatenate([block[i] for block in blocks]) for i in (0, 1))
    return _difference(metric, a, b, studies=int(ours["study_id"].nunique()), resamples=resamples)


def _terms_difference(candidate: pd.DataFrame, reference: pd.DataFrame, metric: str, resamples: int,
                      seed: int) -> PairedDifference:
    terms = sorted(str(c)[:-len(":sum")] for c in candidate.columns if str(c).endswith(":sum"))
    columns = [f"{t}:{part}" for t in terms for part in ("sum", "weight")]
    tables = []
    for which, table in (("candidate", candidate), ("reference", reference)):
        missing = [c for c in ("study_id", *columns) if c not in table.columns]
        if missing:
            raise ValueError(f"the {which}'s per-study terms have no column {', '.join(missing)}")
        tables.append(table.astype({"study_id": str}).sort_values("study_id").reset_index(drop=True))
    ours, theirs = tables
    if not ours["study_id"].equals(theirs["study_id"]):
        raise ValueError(f"the two models were not evaluated on the same studies ({len(ours)} vs {len(theirs)})")
    if ours.empty:
        raise ValueError("no studies to compare")
    counts = _study_counts(ours["study_id"], resamples, seed)
    a, b = _terms_scores(ours, terms, counts)["score"], _terms_scores(theirs, terms, counts)["score"]
    return _difference(metric, a, b, studies=len(ours), resamples=resamples)


def score_intervals(terms: pd.DataFrame, *, resamples: int = PAIRED_RESAMPLES, seed: int = 0
                    ) -> dict[str, tuple[float, float, float]]:
    """A study-level score and each of its terms with a 95 % bootstrap interval over the studies of
    ``terms`` (one row per study, ``<term>:sum`` / ``<term>:weight`` columns, as
    :func:`spinemri.metrics.competition.score_terms` returns): ``{name: (value, ci_low, ci_high)}``
    with the names of the terms and ``score`` (their mean)."""
    names = sorted(str(c)[:-len(":sum")] for c in terms.columns if str(c).endswith(":sum"))
    if terms.empty or not names:
        raise ValueError("no per-study terms to resample")
    study_ids = terms["study_id"] if "study_id" in terms.columns else terms.index.to_series()
    scores = _terms_scores(terms, names, _study_counts(study_ids, resamples, seed))
    out = {}
    for name, values in scores.items():
        low, high = _percentiles(values[1:])
        out[name] = (float(values[0]), low, high)
    return out


def _study_counts(study_ids, resamples: int, seed: int) -> np.ndarray:
    """Row 0: every study once (the point value); then ``resamples`` bootstrap draws of the studies."""
    per_study, codes = study_resamples(pd.Series(study_ids).astype(str).to_numpy(), resamples, seed)
    return np.vstack([np.ones((1, len(codes)), np.int64), per_study[:, codes]])


def _terms_scores(table: pd.DataFrame, terms: list[str], counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each term's ratio of resampled sums and their mean (``score``), per row of ``counts``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = {t: (counts @ table[f"{t}:sum"].to_numpy(np.float64))
                  / (counts @ table[f"{t}:weight"].to_numpy(np.float64)) for t in terms}
    return {**ratios, "score": np.mean(list(ratios.values()), axis=0)}


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    if not np.isfinite(values).any():
        return float("nan"), float("nan")
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return float(low), float(high)


def _difference(metric: str, a: np.ndarray, b: np.ndarray, *, studies: int, resamples: int) -> PairedDifference:
    """From both models' values on the same resamples (index 0: the studies as they are)."""
    low, high = _percentiles((a - b)[1:])
    return PairedDifference(metric=metric, candidate=float(a[0]), reference=float(b[0]), difference=float(a[0] - b[0]),
                            ci_low=low, ci_high=high, studies=studies, resamples=resamples)

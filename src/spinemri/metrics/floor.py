"""Every classifier judged against its floor: the per-site prior of its training rows, on the same held-out rows.

A model that has learned nothing from the images can still score well: on real RSNA labels the grade
depends strongly on the level, so a table of grade frequencies per site (:mod:`spinemri.metrics.prior`)
is a strong baseline. This module predicts that table for the rows a model was evaluated on
(:func:`floor_predictions`: the per-site prior for severity, the training frequencies for the condition and
level heads), scores it with the model's own metric functions, pairs the two on the same bootstrap
resamples of the studies (:mod:`spinemri.metrics.paired`) and turns the paired interval into a
:class:`Verdict` — better than the floor, not distinguishable from it, or worse — with the one sentence
every run, comparison and registry decision begins with. Pure functions: no MLflow, no files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd

from spinemri.data.schema import HEAD_CLASSES
from spinemri.errors import MetricError
from spinemri.metrics import competition, paired
from spinemri.metrics.goals import lower_is_better
from spinemri.metrics.heads import point_scores
from spinemri.metrics.prior import prior_from_samples, prior_rows

FLOOR = "the per-site prior"
BETTER, INDISTINGUISHABLE, WORSE = "better", "indistinguishable", "worse"
# The floor's numbers a run logs beside the model's (<split>_floor_<name>), and the headline of every report.
HEADLINE = ("severity_weighted_log_loss", "severity_roc_auc", "severity_balanced_accuracy")
RSNA_SCORE = "rsna_score"


@dataclass(frozen=True)
class Verdict:
    """How a model compares with its floor on one metric: ``outcome`` (better, indistinguishable or worse),
    the paired difference behind it, and the sentence that says so."""

    outcome: str
    paired: paired.PairedDifference

    @property
    def better(self) -> bool:
        return self.outcome == BETTER

    @property
    def sentence(self) -> str:
        """'Better than the per-site prior: test_severity_weighted_log_loss 0.6123 vs 0.8012 (difference
        -0.1889, 95% CI -0.2501 to -0.1302, over 40 studies; lower is better).'"""
        p = self.paired
        numbers = (f"{p.metric} {p.candidate:.4f} vs {p.reference:.4f} (difference {p.difference:+.4f}, 95% CI "
                   f"{p.ci_low:+.4f} to {p.ci_high:+.4f}, over {p.studies} studies; "
                   f"{'lower' if lower_is_better(p.metric) else 'higher'} is better)")
        if self.outcome == BETTER:
            return f"Better than {FLOOR}: {numbers}."
        if self.outcome == WORSE:
            return f"Worse than {FLOOR}: {numbers}."
        if not p.enough_studies:
            return (f"Not distinguishable from {FLOOR}: {p.studies} held-out studies are too few for a paired "
                    f"decision (at least {paired.MIN_PAIRED_STUDIES}); {numbers}.")
        return f"Not distinguishable from {FLOOR}: {numbers}."

    def to_dict(self) -> dict:
        """The verdict as plain data (a report's ``verdict``)."""
        p = self.paired
        return {"outcome": self.outcome, "sentence": self.sentence, "metric": p.metric, "model": p.candidate,
                "floor": p.reference, "difference": p.difference, "ci_low": p.ci_low, "ci_high": p.ci_high,
                "studies": p.studies}

    def metrics(self, split: str) -> dict[str, float]:
        """``<split>_vs_floor`` (model minus floor on the verdict's metric) with ``_ci_low`` and ``_ci_high`` (the
        number of studies is the tag ``floor_studies``)."""
        p = self.paired
        return {f"{split}_vs_floor": p.difference, f"{split}_vs_floor_ci_low": p.ci_low,
                f"{split}_vs_floor_ci_high": p.ci_high}

    def tags(self) -> dict[str, str]:
        p = self.paired
        return {"verdict": self.outcome, "verdict_sentence": self.sentence, "verdict_metric": p.metric,
                # rounded as shown (the exact values are the metrics above)
                "floor_difference": f"{p.difference:+.4f}", "floor_ci_low": f"{p.ci_low:+.4f}",
                "floor_ci_high": f"{p.ci_high:+.4f}", "floor_studies": str(p.studies)}


def judge(difference: paired.PairedDifference) -> Verdict:
    """Better: the 95 % interval of the paired difference lies wholly on the better side, over at least
    MIN_PAIRED_STUDIES studies; worse: wholly on the other side, over as many; else not distinguishable."""
    if difference.significant:
        return Verdict(BETTER, difference)
    lower = lower_is_better(difference.metric)
    worse = difference.ci_low > 0 if lower else difference.ci_high < 0
    if difference.enough_studies and worse:
        return Verdict(WORSE, difference)
    return Verdict(INDISTINGUISHABLE, difference)


def floor_predictions(held: pd.DataFrame, train: pd.DataFrame, train_targets: Mapping[str, np.ndarray]
                      ) -> dict[str, np.ndarray]:
    """The floor's probabilities for the ``held`` rows: severity (n, 3) from the per-site prior of the ``train``
    rows (:func:`~spinemri.metrics.prior.prior_rows`), condition and level their training frequencies."""
    out = {"severity": prior_rows(prior_from_samples(train), held["condition"].tolist(), held["level"].tolist())}
    for head in HEAD_CLASSES:
        if head == "severity":
            continue
        labels = np.asarray(train_targets[head])
        counts = np.bincount(labels[labels >= 0], minlength=len(HEAD_CLASSES[head])).astype(np.float64) + 1.0
        out[head] = np.tile(counts / counts.sum(), (len(held), 1))
    return out


def floor_metrics(targets: Mapping[str, np.ndarray], floor: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The floor's :data:`HEADLINE` values on the held-out ``targets`` (NaN where undefined)."""
    y = np.asarray(targets["severity"])
    keep = y >= 0
    if not keep.any():
        return {}
    scores = point_scores("severity", y[keep], np.asarray(floor["severity"])[keep])
    return {name: float(scores[name.removeprefix("severity_")]) for name in HEADLINE}


def compare(metric: str, samples: pd.DataFrame, targets: Mapping[str, np.ndarray], proba: Mapping[str, np.ndarray],
            floor: Mapping[str, np.ndarray], *, label: str | None = None) -> Verdict:
    """The model (``proba``) against its floor on ``metric`` (a ``test_<head>_<metric>`` name, or
    ``test_rsna_score``: the competition score at the labelled sites), paired over the studies of
    ``samples``. ``label`` renames the metric in the verdict (``cv_...`` for out-of-fold rows).
    Raises MetricError when the metric cannot be computed on these rows."""
    if paired.head_metric(metric) is not None:
        ours = paired.prediction_table(samples, targets, proba)
        theirs = paired.prediction_table(samples, targets, floor)
        try:
            difference = paired.paired_difference(ours, theirs, metric)
        except ValueError as exc:
            raise MetricError(f"{metric} cannot be compared with {FLOOR}: {exc}") from None
    elif metric.endswith(RSNA_SCORE):
        labels, submission = competition.site_predictions(samples, proba["severity"])
        _, prior = competition.site_predictions(samples, floor["severity"])
        ours = competition.score_terms(labels, submission).reset_index()
        theirs = competition.score_terms(labels, prior).reset_index()
        difference = paired.paired_difference(ours, theirs, metric)
    else:
        raise MetricError(f"{metric} cannot be compared with {FLOOR}: pairable are test_<head>_<metric> with "
                          f"<metric> one of {', '.join(paired.PAIRED_METRICS)}, and test_rsna_score")
    return judge(dataclasses.replace(difference, metric=label or metric))


def compare_submissions(labels: pd.DataFrame, submission: pd.DataFrame, prior: pd.DataFrame,
                        metric: str = "test_rsna_score") -> Verdict:
    """A study-level submission against its floor's (``prior``: the per-site prior as a submission of the same
    studies) on the competition score, paired over the studies ``labels`` holds."""
    ours = competition.score_terms(labels, submission).reset_index()
    theirs = competition.score_terms(labels, prior).reset_index()
    return judge(paired.paired_difference(ours, theirs, metric))


def held_out_name(metric: str, split: str) -> str:
    """The champion metric as a split logs it: test_severity_loss -> cv_severity_loss for ``split`` cv."""
    return f"{split}_{metric.removeprefix('test_')}"

"""The per-site prior: the floor every model is judged against, and where a model's severity output starts.

The prior of a site (a condition at a level) is the constant prediction that scores best under the
competition's weighted log loss on that site's training labels: with n_k labels of grade k weighted
w_k = 1/2/4, ``sum_k n_k w_k (-log p_k)`` is smallest at ``p_k ∝ n_k w_k``. A site's counts are
shrunk toward its condition's frequencies (worth :data:`PSEUDO_ROWS` rows), so that a site with few or
no training labels gets its condition's prior and every grade keeps a finite loss.

On real RSNA labels the grade depends strongly on the level (foraminal narrowing is moderate or
severe at 37 % of L5/S1 sites and 2.5 % of L1/L2 ones), which makes this table a floor a model must
clear before it has learned anything from images. Priors are plain ``{site key: [p0, p1, p2]}``
dicts keyed by the train.csv column of the site (``left_neural_foraminal_narrowing_l4_l5``); priors
recorded by older models are keyed by condition, and every reader here accepts both.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from spinemri.data.schema import CONDITIONS, LEVELS, SEVERITY_WEIGHTS, SITES, SUBMISSION_COLUMNS, label_column, row_id
from spinemri.metrics.competition import label_rows

PSEUDO_ROWS = 3.0  # how many rows of its condition's frequencies a site's own counts are pooled with

Prior = Mapping[str, Sequence[float]]


def weighted_prior(counts: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """Per condition, the constant prediction that minimises the metric's weighted log loss
    (``p_k ∝ (n_k + 1) w_k``; the +1 keeps an unseen grade finite)."""
    prior = {}
    for condition in CONDITIONS:
        mass = (np.asarray(counts.get(condition, (0, 0, 0)), float) + 1.0) * SEVERITY_WEIGHTS
        prior[condition] = (mass / mass.sum()).tolist()
    return prior


def site_prior(site_counts: Mapping[tuple[str, str], Sequence[float]]) -> dict[str, list[float]]:
    """The weight-aware prior of each of the 25 sites from grade counts per (condition, level)."""
    prior = {}
    for condition in CONDITIONS:
        counts = {level: np.asarray(site_counts.get((condition, level), (0, 0, 0)), float) for level in LEVELS}
        pooled = sum(counts.values())
        frequencies = (pooled + 1.0) / (pooled.sum() + 3.0)
        for level in LEVELS:
            mass = (counts[level] + PSEUDO_ROWS * frequencies) * SEVERITY_WEIGHTS
            prior[label_column(condition, level)] = (mass / mass.sum()).tolist()
    return prior


def _counts(table: pd.DataFrame) -> dict[tuple[str, str], np.ndarray]:
    graded = table[table["severity"].notna() & table["condition"].isin(CONDITIONS) & table["level"].isin(LEVELS)]
    return {(c, lv): np.bincount(g["severity"].astype(int), minlength=3)
            for (c, lv), g in graded.groupby(["condition", "level"])}


def prior_from_samples(samples: pd.DataFrame) -> dict[str, list[float]]:
    """The per-site prior of a sample table's graded points (a classifier's training rows). A site graded on
    several images of a study counts once per image, as the training loss counts it."""
    return site_prior(_counts(samples))


def prior_from_labels(labels: pd.DataFrame) -> dict[str, list[float]]:
    """The per-site prior of labels in train.csv's layout (or ``row_id, severity``)."""
    rows = label_rows(labels).dropna(subset=["severity"])
    level = {column: lv for column, lv in ((label_column(c, lv), lv) for c, lv in SITES)}
    rows = rows.assign(level=[level.get(r.split("_", 1)[1]) for r in rows["row_id"]])
    return site_prior(_counts(rows))


def prior_at(prior: Prior, condition: str, level: str) -> list[float]:
    """The prior's probabilities at a site (a prior keyed by condition gives its condition's)."""
    key = label_column(condition, level)
    return list(prior[key] if key in prior else prior[condition])


def prior_grid(prior: Prior) -> np.ndarray:
    """float64 (25, 3): the prior of every site in :data:`~spinemri.data.schema.SITES` order."""
    return np.array([prior_at(prior, c, lv) for c, lv in SITES], dtype=np.float64)


def prior_rows(prior: Prior, conditions: Sequence, levels: Sequence) -> np.ndarray:
    """float64 (n, 3): each row's site prior; a row without a known site gets the mean over its condition's
    sites, or over all sites when the condition is unknown too."""
    grid = prior_grid(prior)
    by_condition = {c: grid[i * len(LEVELS):(i + 1) * len(LEVELS)].mean(axis=0) for i, c in enumerate(CONDITIONS)}
    overall = grid.mean(axis=0)
    out = np.empty((len(conditions), 3))
    for i, (condition, level) in enumerate(zip(conditions, levels)):
        if condition in by_condition and level in LEVELS:
            out[i] = grid[CONDITIONS.index(condition) * len(LEVELS) + LEVELS.index(level)]
        else:
            out[i] = by_condition.get(condition, overall)
    return out


def pooled_prior(samples: pd.DataFrame) -> np.ndarray:
    """float64 (3,): the weight-aware prior of all graded rows together (a severity output that sees no site)."""
    graded = samples["severity"].dropna().astype(int)
    mass = (np.bincount(graded, minlength=3) + 1.0) * SEVERITY_WEIGHTS
    return mass / mass.sum()


def prior_submission(study_ids: Sequence, prior: Prior) -> pd.DataFrame:
    """The prior as a submission: 25 rows per study, each its site's constant probabilities."""
    rows = [(row_id(s, c, lv), *prior_at(prior, c, lv)) for s in study_ids for c in CONDITIONS for lv in LEVELS]
    return pd.DataFrame(rows, columns=list(SUBMISSION_COLUMNS))

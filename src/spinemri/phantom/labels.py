"""The phantom's labels: every study's grades drawn with the RSNA 2024 frequencies, correlated within a study
and between neighbouring levels.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pandas as pd

from spinemri.data import schema
from spinemri.data.schema import CONDITIONS, LEVELS, RSNA_SEVERITY_FREQUENCIES

# Degeneration is commoner low in the spine; thresholds are solved so the marginals stay as above.
_LEVEL_SHIFT = np.array([-0.35, -0.2, 0.0, 0.25, 0.3])


_STUDY_SHARE = 0.35  # share of latent variance common to the whole study


_LEVEL_RHO = 0.6  # correlation between neighbouring levels of one condition


def label_table(studies: int = 1975, blanks: int = 572, seed: int = 0) -> pd.DataFrame:
    """Labels alone, in train.csv's layout, for ``studies`` studies with ``blanks`` blank cells: by default
    the size of the real RSNA 2024 train.csv (1,975 studies, 572 blank cells). No images."""
    rng = np.random.default_rng(seed)
    grades = [sample_labels(rng) for _ in range(studies)]
    table = pd.DataFrame([[schema.SEVERITIES[g[(c, lv)]] for c in CONDITIONS for lv in LEVELS] for g in grades],
                         columns=list(schema.LABEL_COLUMNS), dtype=object)
    cells = rng.choice(table.size, size=min(blanks, table.size), replace=False)
    for cell in cells:
        table.iat[cell // table.shape[1], cell % table.shape[1]] = None
    table.insert(0, "study_id", unique_ids(rng, studies))
    return table.sort_values("study_id", ignore_index=True)


def sample_labels(rng: np.random.Generator) -> dict[tuple[str, str], int]:
    """Severity (0/1/2) of each (condition, level) of one study, correlated across levels.

    A latent Gaussian per condition and level = a study-wide degeneration factor + an AR(1)
    process along the levels + a level shift, cut at thresholds that reproduce the real priors.
    """
    study_factor = rng.standard_normal()
    left_right = {}
    out = {}
    for condition in CONDITIONS:
        group = condition.replace("left_", "").replace("right_", "")
        noise = _ar1(rng, len(LEVELS))
        if group in left_right:  # left and right sides share part of their degeneration
            noise = 0.6 * left_right[group] + math.sqrt(1 - 0.36) * noise
        left_right.setdefault(group, noise)
        latent = math.sqrt(_STUDY_SHARE) * study_factor + math.sqrt(1 - _STUDY_SHARE) * noise + _LEVEL_SHIFT
        t_moderate, t_severe = _thresholds(RSNA_SEVERITY_FREQUENCIES[condition])
        for level, value in zip(LEVELS, latent):
            out[(condition, level)] = int(value > t_moderate) + int(value > t_severe)
    return out


def unique_ids(rng, n) -> list[int]:
    ids: list[int] = []
    seen = set()
    while len(ids) < n:
        for value in rng.integers(1_000_000, 4_294_967_295, size=n).tolist():
            if value not in seen and len(ids) < n:
                seen.add(value)
                ids.append(value)
    return ids


def _ar1(rng, n):
    out = np.empty(n)
    out[0] = rng.standard_normal()
    for i in range(1, n):
        out[i] = _LEVEL_RHO * out[i - 1] + math.sqrt(1 - _LEVEL_RHO**2) * rng.standard_normal()
    return out


_THRESHOLDS: dict = {}


def _thresholds(prior: tuple[float, float, float]) -> tuple[float, float]:
    """Latent cut points whose level-averaged exceedance matches P(>= Moderate) and P(Severe)."""
    if prior not in _THRESHOLDS:
        normal = NormalDist()

        def solve(target):
            lo, hi = -6.0, 6.0
            for _ in range(60):
                mid = (lo + hi) / 2
                share = float(np.mean([1 - normal.cdf(mid - shift) for shift in _LEVEL_SHIFT]))
                lo, hi = (mid, hi) if share > target else (lo, mid)
            return (lo + hi) / 2

        _THRESHOLDS[prior] = (solve(prior[1] + prior[2]), solve(prior[2]))
    return _THRESHOLDS[prior]

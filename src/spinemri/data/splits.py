"""Patient-level splits: every study in exactly one of train/val/test, stratified by its worst grade;
and k-fold cross-validation folds of the studies outside a locked test split.

The thesis split slices at random, so slices of one patient sat in train and test; here the unit
of splitting is the study, so no patient leaks across splits or folds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from spinemri.data.schema import DEFAULT_SPLIT
from spinemri.errors import ConfigError, DatasetError


def split_studies(samples: pd.DataFrame, fractions: tuple[float, float, float] = DEFAULT_SPLIT,
                  seed: int = 0) -> pd.DataFrame:
    """Assign each study to train/val/test.

    ``samples`` needs ``study_id`` and ``severity``. Returns one row per study: study_id,
    worst_severity (its highest grade; 0 when it has none) and split. Strata too small to split
    are merged (Severe into Moderate, then no stratification), so tiny datasets still split.
    Deterministic for a given seed.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ConfigError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    studies = (
        samples.assign(severity=samples["severity"].astype("Float64").fillna(0))
        .groupby("study_id")["severity"].max().astype(int).rename("worst_severity").reset_index()
        .sort_values("study_id", ignore_index=True)
    )
    n = len(studies)
    n_test = _count(n, fractions[2])
    n_val = _count(n, fractions[1])
    if n - n_test - n_val < 1:
        raise DatasetError([f"{n} studies are too few for splits {fractions}: every split needs at least one study; use more studies or other split.fractions"])

    rest, test = _split(studies, n_test, seed)
    train, val = _split(rest, n_val, seed + 1)
    out = pd.concat([train.assign(split="train"), val.assign(split="val"), test.assign(split="test")])
    return out.sort_values("study_id", ignore_index=True)


def _count(n: int, fraction: float) -> int:
    """Studies in a split: rounded, but at least one whenever the fraction is positive."""
    return 0 if fraction == 0 else max(1, int(round(n * fraction)))


def _split(studies: pd.DataFrame, n_out: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.model_selection import train_test_split  # a second to import: workers that import this never split

    if n_out == 0:
        return studies, studies.iloc[0:0]
    for strata in (studies["worst_severity"], studies["worst_severity"].clip(upper=1), None):
        if strata is not None and not _stratifiable(strata, n_out):
            continue
        keep, out = train_test_split(studies, test_size=n_out, random_state=seed, stratify=strata)
        return keep, out
    raise AssertionError("unreachable: the unstratified split always applies")


def _stratifiable(strata: pd.Series, n_out: int) -> bool:
    counts = strata.value_counts()
    n_keep = len(strata) - n_out
    return counts.min() >= 2 and n_out >= len(counts) and n_keep >= len(counts)


def fold_studies(samples: pd.DataFrame, folds: int, test_fraction: float = DEFAULT_SPLIT[2],
                 seed: int = 0) -> pd.DataFrame:
    """Assign each study outside a locked test split to one of ``folds`` cross-validation folds.

    The test split is the one :func:`split_studies` draws with the same ``test_fraction`` and ``seed``
    (so a k-fold run and a single-split run hold out the same studies, and no choice ever sees
    them); the other studies are dealt into folds stratified by their worst grade, merging strata
    too small for ``folds`` as :func:`split_studies` does. Returns one row per study: study_id,
    worst_severity, split (``cv`` or ``test``) and fold (0..folds-1; -1 for test).
    """
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ConfigError(f"folds must be a whole number of at least 2, got {folds!r}")
    if not 0 <= test_fraction < 1:
        raise ConfigError(f"the locked test fraction must be in [0, 1), got {test_fraction}")
    studies = split_studies(samples, (1.0 - test_fraction, 0.0, test_fraction), seed)
    pool = studies[studies["split"] != "test"].reset_index(drop=True)
    if len(pool) < folds:
        raise DatasetError([f"{len(pool)} studies outside the test split are too few for {folds} folds: every "
                            "fold needs at least one study; use more studies or fewer folds"])
    from sklearn.model_selection import KFold, StratifiedKFold

    fold = np.full(len(pool), -1)
    for strata in (pool["worst_severity"], pool["worst_severity"].clip(upper=1), None):
        if strata is not None and strata.value_counts().min() < folds:
            continue
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed) if strata is not None \
            else KFold(folds, shuffle=True, random_state=seed)
        for k, (_, held) in enumerate(splitter.split(pool, strata)):
            fold[held] = k
        break
    out = pd.concat([pool.assign(split="cv", fold=fold),
                     studies[studies["split"] == "test"].assign(fold=-1)])
    return out.sort_values("study_id", ignore_index=True)

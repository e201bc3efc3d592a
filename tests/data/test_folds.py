"""K-fold cross-validation by study, with a locked test split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spinemri.data.splits import fold_studies, split_studies
from spinemri.errors import ConfigError, DatasetError


def _samples(n_studies: int, seed: int = 0) -> pd.DataFrame:
    """Five sites per study; about 60 % of studies at worst Normal/Mild, 25 % Moderate, 15 % Severe."""
    rng = np.random.default_rng(seed)
    worst = rng.choice([0, 1, 2], size=n_studies, p=[0.6, 0.25, 0.15])
    rows = []
    for study, grade in zip(range(100, 100 + n_studies), worst):
        grades = rng.integers(0, grade + 1, 5)
        grades[0] = grade
        rows += [{"study_id": study, "severity": g} for g in grades]
    return pd.DataFrame(rows)


def test_every_study_outside_the_locked_test_split_is_in_exactly_one_fold():
    samples = _samples(120)
    table = fold_studies(samples, 5, test_fraction=0.1, seed=3)
    assert table["study_id"].is_unique and len(table) == 120
    test = table[table["split"] == "test"]
    assert (test["fold"] == -1).all()
    cv = table[table["split"] == "cv"]
    assert sorted(cv["fold"].unique()) == [0, 1, 2, 3, 4]
    sizes = cv["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1  # 108 studies: 21 or 22 a fold
    # The locked test split is the single-split run's, so no fold ever sees it.
    single = split_studies(samples, (0.9, 0.0, 0.1), seed=3)
    assert set(test["study_id"]) == set(single.loc[single["split"] == "test", "study_id"])


def test_folds_are_stratified_by_worst_grade_and_deterministic():
    samples = _samples(200, seed=1)
    table = fold_studies(samples, 5, test_fraction=0.0, seed=0)
    assert (table["split"] == "cv").all()
    counts = pd.crosstab(table["fold"], table["worst_severity"])
    assert (counts.max() - counts.min() <= 1).all(), counts  # each grade spread evenly over the folds
    assert table.equals(fold_studies(samples, 5, test_fraction=0.0, seed=0))
    assert not table["fold"].equals(fold_studies(samples, 5, test_fraction=0.0, seed=1)["fold"])


def test_a_rare_grade_is_merged_rather_than_refused():
    samples = _samples(12, seed=4)
    samples.loc[samples["study_id"] == 100, "severity"] = 2
    samples.loc[(samples["study_id"] != 100) & (samples["severity"] == 2), "severity"] = 1  # one Severe study
    table = fold_studies(samples, 3, test_fraction=0.0)
    assert sorted(table["fold"].unique()) == [0, 1, 2]


@pytest.mark.parametrize("folds, fraction, error, message", [
    (1, 0.1, ConfigError, "folds must be a whole number of at least 2, got 1"),
    (2.5, 0.1, ConfigError, "folds must be a whole number"),
    (3, 1.0, ConfigError, "locked test fraction must be in [0, 1)"),
    (9, 0.2, DatasetError, "too few for 9 folds"),
])
def test_bad_fold_settings_name_the_setting_and_the_fix(folds, fraction, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        fold_studies(_samples(10), folds, test_fraction=fraction)

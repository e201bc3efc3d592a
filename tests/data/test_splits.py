"""Study-level splits: no study in two splits, proportions, stratification, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spinemri.data.splits import split_studies


def _samples(n_studies: int, seed: int = 0) -> pd.DataFrame:
    """25 labelled points per study; about 15 % of studies have a Severe point."""
    rng = np.random.default_rng(seed)
    rows = []
    for study in range(1000, 1000 + n_studies):
        worst = rng.choice([0, 1, 2], p=[0.6, 0.25, 0.15])
        grades = rng.integers(0, worst + 1, size=25)
        grades[0] = worst
        rows += [(study, int(g)) for g in grades]
    return pd.DataFrame(rows, columns=["study_id", "severity"]).astype({"severity": "Int64"})


def test_every_study_in_exactly_one_split_and_no_slice_leaks():
    samples = _samples(120)
    table = split_studies(samples, seed=0)
    assert table["study_id"].is_unique and set(table["study_id"]) == set(samples["study_id"])
    merged = samples.merge(table, on="study_id")
    assert (merged.groupby("study_id")["split"].nunique() == 1).all()


def test_proportions_are_close_to_the_fractions():
    table = split_studies(_samples(120), fractions=(0.8, 0.1, 0.1), seed=0)
    counts = table["split"].value_counts()
    assert counts["train"] == 96 and counts["val"] == 12 and counts["test"] == 12
    table = split_studies(_samples(50), fractions=(0.6, 0.2, 0.2), seed=0)
    assert table["split"].value_counts().to_dict() == {"train": 30, "val": 10, "test": 10}


def test_stratified_by_worst_severity():
    table = split_studies(_samples(200, seed=3), seed=1)
    overall = table["worst_severity"].value_counts(normalize=True)
    for split in ("train", "val", "test"):
        share = table.loc[table["split"] == split, "worst_severity"].value_counts(normalize=True)
        for grade in (0, 1, 2):
            assert abs(share.get(grade, 0) - overall[grade]) < 0.06, (split, grade)


def test_deterministic_per_seed():
    samples = _samples(60)
    a, b = split_studies(samples, seed=7), split_studies(samples.sample(frac=1, random_state=1), seed=7)
    pd.testing.assert_frame_equal(a, b)
    c = split_studies(samples, seed=8)
    assert not a["split"].equals(c["split"])


def test_tiny_datasets_still_split_and_missing_grades_count_as_normal():
    samples = pd.DataFrame({"study_id": [1, 1, 2, 3, 4], "severity": pd.array([2, None, None, 1, 0], dtype="Int64")})
    table = split_studies(samples, seed=0)
    assert sorted(table["split"]) == ["test", "train", "train", "val"]
    assert table.set_index("study_id").loc[2, "worst_severity"] == 0


@pytest.mark.parametrize("fractions, message", [
    ((0.5, 0.5, 0.5), "summing to 1"),
    ((1.2, -0.1, -0.1), "non-negative"),
    ((0.8, 0.2), "three"),
])
def test_bad_fractions(fractions, message):
    with pytest.raises(ValueError, match=message):
        split_studies(_samples(10), fractions=fractions)


def test_too_few_studies():
    with pytest.raises(ValueError, match="2 studies are too few"):
        split_studies(_samples(2), fractions=(0.8, 0.1, 0.1))

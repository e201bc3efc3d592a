"""The per-site prior (the floor) and the verdict every run, comparison and registry decision begins with."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spinemri.data.schema import LEVELS, SEVERITY_WEIGHTS, SITES, label_column
from spinemri.metrics import floor as floors
from spinemri.metrics.paired import PairedDifference
from spinemri.metrics.prior import (prior_at, prior_from_labels, prior_from_samples, prior_grid, prior_rows,
    prior_submission)
from spinemri.training.data import encode_targets

FORAMEN = "left_neural_foraminal_narrowing"


def _graded(rng, studies: int, per_level: dict[str, tuple[float, float, float]]) -> pd.DataFrame:
    """One row per study and level of one condition, the grade drawn from that level's frequencies."""
    rows = [(s, FORAMEN, level, rng.choice(3, p=p)) for s in range(studies) for level, p in per_level.items()]
    frame = pd.DataFrame(rows, columns=["study_id", "condition", "level", "severity"])
    return frame.assign(severity=frame["severity"].astype("Int64"))


def test_the_per_site_prior_is_the_weight_aware_frequency_of_each_site():
    rows = pd.DataFrame({"condition": [FORAMEN] * 40, "level": ["L5/S1"] * 20 + ["L1/L2"] * 20,
                         "severity": pd.array([0] * 10 + [1] * 6 + [2] * 4 + [0] * 20, dtype="Int64")})
    prior = prior_from_samples(rows)
    assert set(prior) == {label_column(c, lv) for c, lv in SITES}
    pooled = (np.array([30, 6, 4]) + 1) / 43  # the condition's frequencies, smoothed
    mass = (np.array([10, 6, 4]) + 3 * pooled) * SEVERITY_WEIGHTS
    assert prior_at(prior, FORAMEN, "L5/S1") == pytest.approx(mass / mass.sum())
    assert prior_at(prior, FORAMEN, "L1/L2")[0] > 0.85 > prior_at(prior, FORAMEN, "L5/S1")[0]
    # a site without labels gets its condition's prior; a condition without labels stays finite
    unseen = np.asarray(prior_at(prior, FORAMEN, "L3/L4"))
    assert unseen == pytest.approx(pooled * SEVERITY_WEIGHTS / (pooled * SEVERITY_WEIGHTS).sum())
    assert np.isfinite(np.log(prior_grid(prior))).all()
    assert prior_rows(prior, [FORAMEN, FORAMEN, None], ["L5/S1", None, None]).shape == (3, 3)


def test_the_prior_of_labels_equals_that_of_the_same_samples():
    rng = np.random.default_rng(0)
    samples = _graded(rng, 30, {lv: (0.8, 0.15, 0.05) for lv in LEVELS})
    labels = pd.DataFrame({"row_id": [f"{s}_{label_column(c, lv)}" for s, c, lv in
                                      zip(samples["study_id"], samples["condition"], samples["level"])],
                           "severity": samples["severity"].astype(int)})
    assert prior_from_labels(labels) == prior_from_samples(samples)


def test_a_prior_keyed_by_condition_still_reads():
    old = {c: [0.7, 0.2, 0.1] for c, _ in SITES}
    table = prior_submission(["7"], old)
    assert len(table) == 25 and table[["normal_mild", "moderate", "severe"]].iloc[0].tolist() == [0.7, 0.2, 0.1]


def _difference(low: float, high: float, studies: int = 40, metric="test_severity_weighted_log_loss"):
    return PairedDifference(metric=metric, candidate=0.7, reference=0.8, difference=(low + high) / 2,
                            ci_low=low, ci_high=high, studies=studies, resamples=2000)


def test_the_verdict_sentence_for_a_better_an_indistinguishable_and_a_worse_model():
    better = floors.judge(_difference(-0.2, -0.05))
    assert better.outcome == "better" and better.better
    assert better.sentence.startswith("Better than the per-site prior: test_severity_weighted_log_loss 0.7000 vs "
                                      "0.8000 (difference -0.1250, 95% CI -0.2000 to -0.0500, over 40 studies")
    same = floors.judge(_difference(-0.05, 0.02))
    assert same.outcome == "indistinguishable" and not same.better
    assert same.sentence.startswith("Not distinguishable from the per-site prior: test_severity_weighted_log_loss")
    worse = floors.judge(_difference(0.01, 0.1))
    assert worse.outcome == "worse"
    assert worse.sentence.startswith("Worse than the per-site prior:")
    few = floors.judge(_difference(-0.3, -0.2, studies=4))
    assert few.outcome == "indistinguishable"
    assert "4 held-out studies are too few for a paired decision (at least 5)" in few.sentence
    # higher is better for an AUC: a negative interval is worse
    auc = floors.judge(_difference(-0.2, -0.1, metric="test_severity_roc_auc"))
    assert auc.outcome == "worse" and "higher is better" in auc.sentence
    assert better.metrics("cv") == {"cv_vs_floor": -0.125, "cv_vs_floor_ci_low": -0.2, "cv_vs_floor_ci_high": -0.05}
    assert better.tags()["floor_studies"] == "40"
    assert better.tags()["verdict"] == "better" and better.tags()["verdict_sentence"] == better.sentence


def test_a_model_that_is_the_prior_is_not_distinguishable_and_one_that_knows_the_grades_is_better():
    rng = np.random.default_rng(3)
    per_level = {"L1/L2": (0.95, 0.04, 0.01), "L3/L4": (0.75, 0.2, 0.05), "L5/S1": (0.55, 0.3, 0.15)}
    train, held = _graded(rng, 60, per_level), _graded(rng, 30, per_level)
    floor = floors.floor_predictions(held, train, encode_targets(train))
    targets = encode_targets(held)
    same = floors.compare("test_severity_weighted_log_loss", held, targets, floor, floor)
    assert same.outcome == "indistinguishable" and same.paired.difference == 0
    knowing = {**floor, "severity": np.eye(3)[targets["severity"]] * 0.9 + 0.1 / 3}
    better = floors.compare("test_severity_weighted_log_loss", held, targets, knowing, floor, label="cv_severity_weighted_log_loss")
    assert better.outcome == "better" and better.paired.metric == "cv_severity_weighted_log_loss"
    values = floors.floor_metrics(targets, floor)
    assert values["severity_roc_auc"] > 0.55  # the level alone separates the grades
    assert same.paired.reference == pytest.approx(values["severity_weighted_log_loss"])

"""Referral operating points: thresholds chosen on fitting rows for a target sensitivity, and their rates."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from spinemri.data.schema import ANY_LEVEL, SEVERE_SPINAL
from spinemri.metrics import operating

SPINAL, FORAMINAL = "spinal_canal_stenosis", "left_neural_foraminal_narrowing"


def _rows(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    samples = pd.DataFrame({"study_id": rng.integers(0, 40, n).astype(str),
                            "condition": rng.choice([SPINAL, FORAMINAL], n), "level": rng.choice(["L3/L4", "L4/L5"], n)})
    grade = rng.choice([-1, 0, 1, 2], n, p=[0.05, 0.55, 0.25, 0.15])
    proba = rng.dirichlet([2, 1, 1], n)
    proba[grade >= 1] = (proba[grade >= 1] + [0, 0.6, 0.6]) / 2.2  # referable sites score higher
    return samples, grade, proba / proba.sum(axis=1, keepdims=True)


def test_the_threshold_is_the_highest_that_reaches_the_target_on_the_fitting_rows():
    judged = pd.DataFrame({"study_id": list("abcdefghij"), "event": [True] * 5 + [False] * 5,
                           "score": [0.9, 0.8, 0.7, 0.6, 0.1, 0.5, 0.4, 0.3, 0.2, 0.05]})
    assert operating.fit_threshold(judged, 0.8) == (0.6, 0.8)  # 4 of 5 events at or above 0.6
    assert operating.fit_threshold(judged, 0.81) == (0.1, 1.0)  # a fifth needs every event
    assert all(math.isnan(v) for v in operating.fit_threshold(judged[~judged["event"]], 0.9))
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        operating.fit_threshold(judged, 0)


def test_each_point_reaches_its_target_where_it_was_fitted():
    samples, grade, proba = _rows()
    targets = {**{name: 0.9 for name in operating.POINTS}, SEVERE_SPINAL: 0.95}
    points = operating.fit_thresholds(samples, grade, proba, targets)
    for name in (SPINAL, FORAMINAL, SEVERE_SPINAL, ANY_LEVEL):
        point = points[name]
        assert point.events > 0 and point.fitted_sensitivity >= targets[name], point
        judged = operating.cases(name, samples, grade, proba)
        assert operating.rates(judged, point.threshold, resamples=50)["sensitivity"][0] == point.fitted_sensitivity
    assert points["right_subarticular_stenosis"].to_dict()["threshold"] is None  # no such row: nothing to fit


def test_rates_are_the_counts_of_the_confusion_table_with_intervals_over_studies():
    judged = pd.DataFrame({"study_id": ["a", "a", "b", "b", "c", "c"], "event": [True, False, True, False, True, True],
                           "score": [0.9, 0.7, 0.2, 0.1, 0.8, 0.6]})
    found = operating.rates(judged, 0.65, resamples=200)
    # flagged: 0.9 (event), 0.7 (not), 0.8 (event); missed: 0.2 and 0.6 (events); cleared: 0.1
    assert found["sensitivity"][0] == pytest.approx(2 / 4) and found["specificity"][0] == pytest.approx(1 / 2)
    assert found["ppv"][0] == pytest.approx(2 / 3) and found["npv"][0] == pytest.approx(1 / 3)
    assert found["referral_rate"][0] == pytest.approx(3 / 6)
    assert all(low <= value <= high for value, low, high in found.values())


def test_a_level_is_referable_when_any_of_its_sites_is_and_scores_its_highest_site():
    samples = pd.DataFrame({"study_id": ["1", "1", "1", "2"], "condition": [SPINAL, FORAMINAL, SPINAL, SPINAL],
                            "level": ["L4/L5", "L4/L5", "L5/S1", "L4/L5"]})
    grade = np.array([0, 1, 0, -1])  # study 2's site is unlabelled: left out
    proba = np.array([[0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]])
    judged = operating.cases(ANY_LEVEL, samples, grade, proba)[["study_id", "event", "score"]]
    assert judged.to_dict("list") == {"study_id": ["1", "1"], "event": [True, False], "score": [0.5, pytest.approx(0.1)]}
    severe = operating.cases(SEVERE_SPINAL, samples, grade, proba)
    assert severe["event"].tolist() == [False, False] and severe["score"].tolist() == [0.1, 0.05]


def test_the_prior_refers_everything_or_nothing():
    samples, grade, _ = _rows()
    constant = np.tile([0.6, 0.3, 0.1], (len(grade), 1))
    point = operating.fit_thresholds(samples, grade, constant, {n: 0.9 for n in operating.POINTS})[SPINAL]
    rate = operating.rates(operating.cases(SPINAL, samples, grade, constant), point.threshold, resamples=20)
    assert rate["referral_rate"][0] == 1.0 and rate["sensitivity"][0] == 1.0 and rate["specificity"][0] == 0.0


def test_the_served_flag_is_the_threshold_applied_to_the_row_s_condition():
    points = {SPINAL: {"threshold": 0.5}, FORAMINAL: {"threshold": 0.3}, SEVERE_SPINAL: {"threshold": 0.2},
              "left_subarticular_stenosis": {"threshold": None}}
    proba = np.array([[0.6, 0.3, 0.1], [0.6, 0.15, 0.25], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.1, 0.1, 0.8]])
    conditions = [SPINAL, SPINAL, FORAMINAL, "left_subarticular_stenosis", "healthy"]
    # 0.4 < 0.5; severe 0.25 >= 0.2; 0.4 >= 0.3; no threshold; a healthy prediction has none either
    assert operating.refer(points, conditions, proba).tolist() == [False, True, True, False, False]

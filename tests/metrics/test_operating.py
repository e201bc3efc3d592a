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


def test_the_threshold_is_the_conformal_quantile_of_the_referable_scores():
    # 10 referable scores 0.1 ... 1.0: the k-th lowest, k = floor((1 - target)(n + 1))
    judged = pd.DataFrame({"study_id": list("abcdefghijklmno"), "event": [True] * 10 + [False] * 5,
                           "score": [*np.linspace(0.1, 1.0, 10), 0.5, 0.4, 0.3, 0.2, 0.05]})
    assert operating.fit_threshold(judged, 0.8) == (pytest.approx(0.2), 0.9)  # k = 2: 9 of 10 at or above
    assert operating.fit_threshold(judged, 0.5) == (pytest.approx(0.5), 0.6)  # k = 5
    # k = 0: too few to promise 0.95 from the cases alone: a prediction bound, below the lowest referable score
    threshold, reached = operating.fit_threshold(judged, 0.95)
    assert threshold < 0.1 and reached == 1.0
    assert operating.fit_threshold(judged.iloc[[3]], 0.95) == (pytest.approx(0.4), 1.0)  # one case: its score
    assert (operating.certifying_events(0.9), operating.certifying_events(0.95)) == (9, 19)
    assert all(math.isnan(v) for v in operating.fit_threshold(judged[~judged["event"]], 0.9))
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        operating.fit_threshold(judged, 0)


def test_on_new_cases_the_threshold_reaches_its_target_on_average_where_the_plain_quantile_falls_short():
    rng = np.random.default_rng(0)
    reached, plain = [], []
    for _ in range(400):  # 30 referable fitting cases from U(0, 1): a new case's score is U(0, 1) too
        scores = rng.uniform(size=30)
        threshold, _ = operating.fit_threshold(pd.DataFrame({"event": True, "score": scores}), 0.9)
        reached.append(1 - threshold)
        plain.append(1 - np.sort(scores)[::-1][math.ceil(0.9 * 30) - 1])  # the highest threshold that reaches 0.9
    assert np.mean(reached) >= 0.895 > np.mean(plain)  # expected: 1 - 3/31 = 0.903 vs 1 - 4/31 = 0.871


def test_on_few_referable_cases_the_prediction_bound_reaches_its_target_on_average():
    rng = np.random.default_rng(0)
    reached, lowest = [], []
    for _ in range(400):  # 5 referable cases (9 would be needed for 0.90) whose logits are normal, N(2, 1)
        logits = rng.normal(2.0, 1.0, 5)
        threshold, _ = operating.fit_threshold(pd.DataFrame({"event": True, "score": 1 / (1 + np.exp(-logits))}), 0.9)
        new = rng.normal(2.0, 1.0, 2000)
        reached.append(np.mean(1 / (1 + np.exp(-new)) >= threshold))
        lowest.append(np.mean(new >= logits.min()))
    assert 0.88 <= np.mean(reached) <= 0.93 and np.mean(lowest) < 0.86  # the lowest of 5 covers 5/6 on average


def test_out_of_fold_rates_judge_each_study_by_its_own_fold_model_s_other_studies():
    # Two fold models that rank the sites alike but put them on different scales: a threshold from one fold's
    # scores would refer nearly nothing of the other's; within its fold each reaches the target.
    rng = np.random.default_rng(1)
    frames, grades, scores = [], [], []
    for fold in (0, 1):
        samples = pd.DataFrame([(f"{fold}-{s}", SPINAL, lv) for s in range(60) for lv in ("L1/L2", "L2/L3", "L3/L4",
                                                                                      "L4/L5", "L5/S1")],
                               columns=["study_id", "condition", "level"]).assign(fold=fold)
        grade = (rng.uniform(size=len(samples)) < 0.3).astype(int)
        score = np.where(grade == 1, rng.uniform(0.3, 1.0, len(samples)), rng.uniform(0.0, 0.7, len(samples)))
        frames.append(samples)
        grades.append(grade)
        scores.append(score if fold == 0 else 1 - (1 - score) * 0.01)  # fold 1's model: every score near 1
    samples, grade, score = pd.concat(frames, ignore_index=True), np.concatenate(grades), np.concatenate(scores)
    proba = np.stack([1 - score, score, np.zeros_like(score)], axis=1)
    targets = {name: 0.9 for name in operating.POINTS}
    points = operating.fit_thresholds(samples, grade, proba, targets)
    floor = np.tile([0.7, 0.3, 0.0], (len(samples), 1))
    table = operating.evaluate_cross_fitted(points, samples, grade, proba,
                                            operating.fit_thresholds(samples, grade, floor, targets), floor,
                                            resamples=200)
    sensitivity = table[(table["point"] == SPINAL) & (table["rate"] == "sensitivity")].iloc[0]
    assert sensitivity["ci_low"] <= 0.9 <= sensitivity["ci_high"] and 0.85 <= sensitivity["value"] <= 0.97
    judged = operating.cases(SPINAL, samples, grade, proba)
    other = operating.fit_threshold(judged[judged["fold"] == 1], 0.9)[0]  # fold 1's threshold on fold 0's scores
    assert operating.rates(judged[judged["fold"] == 0], other, resamples=10)["sensitivity"][0] < 0.1


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

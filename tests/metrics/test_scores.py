"""The metric registry: one function per metric, read by the report, the bootstrap and the paired comparison."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spinemri.data.schema import HEAD_CLASSES
from spinemri.metrics import heads, paired, scores
from spinemri.metrics.goals import lower_is_better
from spinemri.metrics.scores import REGISTRY, Metric, Resamples


def _split(n_studies=12, per_study=6, seed=0):
    rng = np.random.default_rng(seed)
    n = n_studies * per_study
    samples = pd.DataFrame({"study_id": np.repeat(np.arange(n_studies), per_study),
                            "series_id": 1, "instance_number": np.tile(np.arange(per_study), n_studies)})
    targets = {h: rng.integers(0, len(c), n) for h, c in HEAD_CLASSES.items()}
    proba = {h: rng.dirichlet(np.ones(len(c)), n) for h, c in HEAD_CLASSES.items()}
    return samples, targets, proba


def test_every_registered_metric_reaches_the_report_and_the_paired_bootstrap():
    samples, targets, proba = _split()
    report = heads.evaluate_predictions(samples, targets, proba, n_boot=30)
    for head in HEAD_CLASSES:
        expected = [n for n, m in REGISTRY.items() if not m.per_class and m.applies_to(head)]
        assert list(report["heads"][head]["metrics"]) == expected
        for name in expected:
            assert paired.head_metric(f"test_{head}_{name}") == (head, name)
    assert paired.head_metric("test_condition_weighted_log_loss") is None  # severity's own
    per_class = report["heads"]["severity"]["per_class"]["Moderate"]
    assert set(scores.PER_CLASS_METRICS) <= set(per_class)


def test_the_point_value_is_the_bootstrap_function_at_every_row_once():
    samples, targets, proba = _split(seed=3)
    y, p = targets["severity"], proba["severity"]
    ones = scores.resample_scores(y, p, np.ones((1, len(y))), severity=True)
    point = scores.point_scores(y, p, severity=True)
    for name, metric in REGISTRY.items():
        assert np.array_equal(np.atleast_1d(point[name]), np.atleast_1d(ones[name][0]), equal_nan=True), name
    twice = scores.resample_scores(y, p, np.full((1, len(y)), 2.0), severity=True)
    for name in scores.PAIRED_METRICS:  # every row counted twice: the same value
        assert twice[name][0] == pytest.approx(ones[name][0]), name


def test_each_metric_goal_comes_from_its_name():
    for name, metric in REGISTRY.items():
        assert metric.goal == ("minimize" if lower_is_better(name) else "maximize"), name
    assert REGISTRY["loss"].goal == "minimize" and REGISTRY["roc_auc"].goal == "maximize"
    assert REGISTRY["ece"].goal == "minimize"


def test_a_metric_added_to_the_registry_is_computed_reported_and_paired(monkeypatch):
    def top_class_confidence(r: Resamples) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return r.weights @ r.proba.max(axis=1) / r.weights.sum(axis=1)

    monkeypatch.setitem(REGISTRY, "confidence", Metric("confidence", top_class_confidence))
    samples, targets, proba = _split(seed=5)
    report = heads.evaluate_predictions(samples, targets, proba, n_boot=40)
    entry = report["heads"]["level"]["metrics"]["confidence"]
    assert entry["value"] == pytest.approx(proba["level"].max(axis=1).mean())
    assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    assert paired.head_metric("test_level_confidence") == ("level", "confidence")

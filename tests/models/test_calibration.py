"""Temperature scaling: the fitted temperature undoes a known over-confidence; classes never change."""

from __future__ import annotations

import numpy as np
import pytest

from spinemri.models import calibration


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _draw(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, size=(n, 3))
    truth = _softmax(logits)
    y = np.array([rng.choice(3, p=p) for p in truth])
    return logits, y


def test_scaling_keeps_the_class_and_the_identity_at_one():
    logits, _ = _draw(200)
    p = _softmax(logits)
    np.testing.assert_allclose(calibration.scale(p, 1.0), p, atol=1e-12)
    for t in (0.3, 2.5):
        scaled = calibration.scale(p, t)
        np.testing.assert_allclose(scaled.sum(axis=1), 1.0)
        assert (scaled.argmax(axis=1) == p.argmax(axis=1)).all()
        np.testing.assert_allclose(scaled, _softmax(np.log(p) / t), atol=1e-9)


@pytest.mark.parametrize("sharpness", [3.0, 0.5])
def test_the_fitted_temperature_undoes_over_and_under_confidence(sharpness):
    logits, y = _draw()
    overconfident = _softmax(logits * sharpness)  # what a model that is `sharpness` times too sure says
    t = calibration.fit_temperature(y, overconfident)
    assert t == pytest.approx(sharpness, rel=0.1)

    def nll(p):
        return -np.mean(np.log(p[np.arange(len(y)), y]))
    assert nll(calibration.scale(overconfident, t)) < nll(overconfident)


def test_severity_gets_a_temperature_per_condition_with_enough_rows():
    logits, y = _draw(600)
    conditions = np.where(np.arange(600) < 300, "spinal_canal_stenosis", "left_subarticular_stenosis").astype(object)
    conditions[-10:] = "right_subarticular_stenosis"  # too few rows: the head's temperature
    proba = _softmax(logits)
    proba[:300] = _softmax(logits[:300] * 3.0)
    targets = {"severity": y, "level": np.full(600, -1)}
    fitted = calibration.fit(targets, {"severity": proba, "level": np.full((600, 5), 0.2)}, list(conditions),
                             severity_weights=False)
    assert fitted.severity_by_condition["spinal_canal_stenosis"] == pytest.approx(3.0, rel=0.2)
    assert fitted.severity_by_condition["left_subarticular_stenosis"] == pytest.approx(1.0, rel=0.2)
    assert "right_subarticular_stenosis" not in fitted.severity_by_condition
    assert fitted.heads["level"] == 1.0  # no labelled rows: nothing to fit
    applied = fitted.apply({"severity": proba[-12:]}, list(conditions[-12:]))["severity"]
    np.testing.assert_allclose(applied[-10:], calibration.scale(proba[-10:], fitted.heads["severity"]))
    np.testing.assert_allclose(applied[:2], calibration.scale(proba[-12:-10],
                                                              fitted.severity_by_condition["left_subarticular_stenosis"]))
    assert calibration.Temperatures.from_dict(fitted.to_dict()) == fitted

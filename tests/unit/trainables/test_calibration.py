"""Temperature scaling and the calibration metrics: hand-computed cases and an over-confident model."""
from __future__ import annotations

import numpy as np
import pytest

from trainables.calibration import (
    apply_temperature,
    calibrate,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    reliability,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_ece_nll_brier_by_hand():
    # two images at confidence 0.9 (bin 14: one right, one wrong), one at 0.6 (bin 9: right)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    y = np.array([0, 1, 1])
    # bin (0.85, 0.9]: accuracy 0.5, confidence 0.9 -> gap 0.4, weight 2/3; bin (0.6]: 1 vs 0.6 -> 0.4, weight 1/3
    assert expected_calibration_error(probs, y) == pytest.approx(0.4)
    m = calibration_metrics(probs, y)
    assert m["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.1) + np.log(0.6)) / 3)
    assert m["brier"] == pytest.approx((0.02 + 1.62 + 0.32) / 3)  # sum of squared errors to the one-hot label
    r = reliability(probs, y)
    assert r["count"].sum() == 3 and r["count"][13] == 2 and r["count"][8] == 1


def test_temperature_keeps_the_ranking_and_one_is_identity():
    rng = np.random.default_rng(0)
    probs = _softmax(rng.normal(size=(50, 7)))
    assert np.allclose(apply_temperature(probs, 1.0), probs)
    for t in (0.3, 3.0):
        scaled = apply_temperature(probs, t)
        assert (scaled.argmax(1) == probs.argmax(1)).all() and np.allclose(scaled.sum(1), 1)
    assert (apply_temperature(probs, 3.0).max(1) < probs.max(1)).all()  # T > 1 softens


def test_calibration_repairs_an_over_confident_model():
    """Labels drawn from softmax(z); the model says softmax(3 z): T near 3, lower ECE and NLL, same accuracy."""
    rng = np.random.default_rng(1)
    z = rng.normal(scale=1.5, size=(6000, 7))
    truth = _softmax(z)
    y = np.array([rng.choice(7, p=p) for p in truth])
    model = _softmax(3 * z)
    val, test = slice(0, 3000), slice(3000, None)
    out = calibrate(model[val], y[val], model[test], y[test])
    assert out["temperature"] == pytest.approx(3.0, rel=0.1)
    assert out["ece"] > 0.1 and out["ece_calibrated"] < out["ece"] / 3
    assert out["nll_calibrated"] < out["nll"] and out["brier_calibrated"] < out["brier"]
    assert (out["probs_calibrated"].argmax(1) == model[test].argmax(1)).all()


def test_fit_temperature_of_a_calibrated_model_is_about_one():
    rng = np.random.default_rng(2)
    truth = _softmax(rng.normal(scale=1.5, size=(5000, 7)))
    y = np.array([rng.choice(7, p=p) for p in truth])
    assert fit_temperature(truth, y) == pytest.approx(1.0, abs=0.08)
    assert fit_temperature(truth[:0], y[:0]) == 1.0

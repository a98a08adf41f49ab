"""Calibrated probabilities: temperature scaling, and how well probabilities match frequencies (ECE, NLL, Brier).

Temperature scaling (Guo et al., 2017) divides a model's logits by one number T fitted to
minimise the negative log-likelihood of held-out labels: the ranking of the classes, hence
accuracy, is unchanged; only how sure the model says it is. It is applied here to the
log-probabilities, `softmax(log p / T)`, which equals `softmax(z / T)` for a single model's
logits z and also covers an ensemble, whose output is a mean of softmaxes (the final stage
scales that mean). The final stage fits T on PublicTest and measures on PrivateTest.

NLL and the Brier score are scikit-learn's (`log_loss`, multiclass `brier_score_loss`: the
mean over images of the squared distance to the one-hot label, 0..2). The expected
calibration error is computed here: scikit-learn's `calibration_curve` is binary only,
and ECE is the top-label version over the predicted class's confidence.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import brier_score_loss, log_loss

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al.
_EPS = 1e-12
_LOG_T_RANGE = (math.log(0.05), math.log(20.0))  # T between 0.05 and 20: wider is never a useful fit


def _log(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """`softmax(log(probs) / temperature)` row by row (float64); temperature 1 returns the rows renormalised."""
    z = _log(probs) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the NLL of `y` under `apply_temperature(probs, T)`; 1.0 for no labels.

    A one-dimensional bounded search over log T (scipy's Brent method); the NLL is
    convex in 1/T, so the minimum found is the minimum.
    """
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    logp = _log(probs)
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        z = logp / math.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, y]))

    best = minimize_scalar(nll, bounds=_LOG_T_RANGE, method="bounded", options={"xatol": 1e-4})
    return float(math.exp(best.x))


def reliability(probs: np.ndarray, y: np.ndarray, *, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: image count, mean confidence and accuracy (NaN in empty bins)."""
    p = np.asarray(probs, dtype=np.float64)
    conf, right = p.max(axis=1), p.argmax(axis=1) == np.asarray(y)
    index = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)  # bin k holds (k/bins, (k+1)/bins]
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=conf, minlength=bins) / count
        accuracy = np.bincount(index, weights=right, minlength=bins) / count
    return {"count": count, "confidence": confidence, "accuracy": accuracy,
            "edges": np.linspace(0.0, 1.0, bins + 1)}


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, *, bins: int = ECE_BINS) -> float:
    """Top-label ECE: the image-weighted mean over bins of |accuracy - mean confidence|."""
    r = reliability(probs, y, bins=bins)
    used = r["count"] > 0
    if not used.any():
        return float("nan")
    gaps = np.abs(r["accuracy"][used] - r["confidence"][used])
    return float(np.sum(r["count"][used] * gaps) / r["count"].sum())


def calibration_metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """ECE, NLL (natural log) and multiclass Brier score of `probs` (N, C) for labels `y` (N,)."""
    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 only within 1e-7: sklearn warns
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return {"ece": float("nan"), "nll": float("nan"), "brier": float("nan")}
    labels = np.arange(p.shape[1])
    return {"ece": expected_calibration_error(p, y), "nll": float(log_loss(y, np.clip(p, _EPS, 1.0), labels=labels)),
            "brier": float(brier_score_loss(y, p, labels=labels, scale_by_half=False))}


CALIBRATION_COLUMNS = ("temperature", "ece", "ece_calibrated", "nll", "nll_calibrated", "brier", "brier_calibrated")


def compare(test_probs: np.ndarray, test_y: np.ndarray, temperature: float) -> dict:
    """The metrics of `test_probs` before and after `temperature`: the `CALIBRATION_COLUMNS` plus
    `probs_calibrated`."""
    calibrated = apply_temperature(test_probs, temperature)
    before, after = calibration_metrics(test_probs, test_y), calibration_metrics(calibrated, test_y)
    return {"temperature": float(temperature), **before, **{f"{k}_calibrated": after[k] for k in after},
            "probs_calibrated": calibrated}


def calibrate(val_probs: np.ndarray, val_y: np.ndarray, test_probs: np.ndarray, test_y: np.ndarray) -> dict:
    """Fit T on (val_probs, val_y), then `compare` on the test split."""
    return compare(test_probs, test_y, fit_temperature(val_probs, val_y))

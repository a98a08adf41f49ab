"""Classification metrics and error analysis over softmax probabilities (scikit-learn; no Ray, no torch).

Every function takes plain arrays (labels (N,), probabilities (N, C)) so the final
stage, `search.evaluate` and the tests share one definition of each number. Class
indices are always `range(C)`, so a class missing from a small test set still gets
its row (with support 0) and the top-k scores never re-index the classes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

# The search objective, named once: a trial's best PublicTest accuracy over its epochs so far
# (what the final stage keeps: the weights of the best epoch), or, once its loss diverged, the
# accuracy of the model it diverged to. ASHA's rungs, Optuna's values, the ranking of
# trials.csv and the final stage's choice all read this one reported value.
METRIC, MODE = "objective", "max"
# scikit-learn is imported where a metric is computed, not here: every trial imports this module for
# METRIC, and sklearn's import costs about 1 s of a core per trial process.

# The scalar metrics `classification_metrics` returns, in the order the tables show them.
SCALAR_METRICS = ("accuracy", "precision_macro", "recall_macro", "fbeta_macro", "precision_weighted",
                  "recall_weighted", "fbeta_weighted", "top2_accuracy", "top3_accuracy")


def _check(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> None:
    if probs.ndim != 2 or probs.shape != (len(y_true), num_classes):
        raise ValueError(f"probs must have shape ({len(y_true)}, {num_classes}), got {probs.shape}")
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")


def top_k_accuracy(y_true: Sequence[int], probs: np.ndarray, k: int) -> float:
    """Share of samples whose true class is among the `k` most probable (1.0 when k >= C)."""
    y, p = np.asarray(y_true, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    if k >= p.shape[1]:  # sklearn warns and returns 1.0 here; say it without the warning
        return 1.0
    from sklearn.metrics import top_k_accuracy_score

    return float(top_k_accuracy_score(y, p, k=k, labels=np.arange(p.shape[1])))


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, *, beta: float = 1.0,
                           class_names: Sequence[str]) -> dict:
    """Accuracy, macro and weighted precision/recall/F-beta, top-2/3, per-class table and confusion.

    Predictions are the argmax of `probs` (N, C). Returns the scalars named in
    `SCALAR_METRICS` plus `n_images`, `per_class` (a DataFrame: class, precision,
    recall, fbeta, support), `confusion` (counts, rows = true class) and
    `confusion_normalized` (each row divided by its support; a class with no
    samples gets a row of zeros). Precision of a class never predicted counts as 0.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    labels = np.arange(len(class_names))
    _check(y, p, len(labels))
    pred = p.argmax(1)
    out: dict = {"n_images": int(len(y)), "accuracy": float(accuracy_score(y, pred))}
    for average in ("macro", "weighted"):
        precision, recall, fbeta, _ = precision_recall_fscore_support(
            y, pred, beta=beta, labels=labels, average=average, zero_division=0)
        out.update({f"precision_{average}": float(precision), f"recall_{average}": float(recall),
                    f"fbeta_{average}": float(fbeta)})
    out["top2_accuracy"] = top_k_accuracy(y, p, 2)
    out["top3_accuracy"] = top_k_accuracy(y, p, 3)
    precision, recall, fbeta, support = precision_recall_fscore_support(
        y, pred, beta=beta, labels=labels, average=None, zero_division=0)
    out["per_class"] = pd.DataFrame({"class": list(class_names), "precision": precision, "recall": recall,
                                     "fbeta": fbeta, "support": support.astype(np.int64)})
    cm = confusion_matrix(y, pred, labels=labels)
    out["confusion"] = cm
    out["confusion_normalized"] = normalize_rows(cm)
    return out


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Each row of a confusion matrix divided by its sum (the share of the true class); empty rows stay 0."""
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros(cm.shape, dtype=np.float64), where=totals > 0)


def masked_accuracy(y_true: Sequence[int], probs: np.ndarray, keep: np.ndarray) -> float:
    """Accuracy over the samples where `keep` is True (NaN when none are kept)."""
    keep = np.asarray(keep, dtype=bool)
    if not keep.any():
        return float("nan")
    return float((np.asarray(probs)[keep].argmax(1) == np.asarray(y_true)[keep]).mean())


def confused_pairs(cm: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """The off-diagonal cells of a confusion matrix with a count, most frequent confusion first.

    Columns: true, predicted, count, share_of_true (count over the true class's
    support). Ties in count are broken by the larger share.
    """
    share = normalize_rows(cm)
    rows = [{"true": class_names[i], "predicted": class_names[j], "count": int(cm[i, j]),
             "share_of_true": float(share[i, j])}
            for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j] > 0]
    df = pd.DataFrame(rows, columns=["true", "predicted", "count", "share_of_true"])
    return df.sort_values(["count", "share_of_true"], ascending=False, kind="stable").reset_index(drop=True)


def misclassified(probs: np.ndarray, y_true: Sequence[int], rows: Sequence[int],
                  class_names: Sequence[str]) -> pd.DataFrame:
    """Every wrong prediction, most confident mistake first.

    Columns: row (the source data row), true, predicted, confidence (the probability
    of the predicted class) and p_true (the probability the model gave the true
    class). The DataFrame's index is each sample's position in `probs`, so the
    caller can pick the matching images.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    pred = p.argmax(1)
    wrong = np.flatnonzero(pred != y)
    names = np.asarray(class_names, dtype=object)
    df = pd.DataFrame({"row": np.asarray(rows, dtype=np.int64)[wrong], "true": names[y[wrong]],
                       "predicted": names[pred[wrong]], "confidence": p[wrong, pred[wrong]],
                       "p_true": p[wrong, y[wrong]]}, index=wrong)
    return df.sort_values("confidence", ascending=False, kind="stable")


def ensemble_probs(probs: Sequence[np.ndarray]) -> np.ndarray:
    """The softmax average of several models' probabilities (each (N, C)), the usual ensemble."""
    if not len(probs):
        raise ValueError("an ensemble needs at least one model")
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probs])
    return stacked.mean(axis=0)

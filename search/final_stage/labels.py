"""The label audit: a model's FER2013 mistakes read against the FER+ re-annotation, and cleanlab's label issues.

Each FER2013 image has one label; FER+ (Microsoft's `fer2013new.csv`) had ten annotators vote on every
image again. Where the FER+ majority and the FER2013 label differ, one of them is likely wrong, and a
model's "mistake" there may be the label's. For one model's probabilities on the split scored this
module computes (the final stage for the model it analyses, `search.evaluate` for the weights given):

- `audit_table`, per FER2013 emotion and over all: accuracy against the FER2013 label (the headline),
  against the FER+ majority (on the 7 emotions the two share: images whose majority is contempt,
  unknown or not-a-face, or that have no majority, are counted and left out), on the agreed subset
  where the two labels match; of the model's mistakes with a FER+ majority, the share where FER+ sides
  with the model, with the label or with neither; and `accuracy_either` (a prediction counted right
  when it matches either label): `noise_points`, its gap to the headline, is how far label noise
  holds the headline down by FER+'s reading;
- `label_issues`: cleanlab's label issues (confident learning, `cleanlab.filter.find_label_issues`)
  from the model's probabilities, which are out-of-sample on a split it never trained on, with their
  precision against FER+: of the flagged images with a FER+ majority, the share where it disagrees
  with the FER2013 label, against that share over every image (the base rate) and over the model's
  mistakes (the flag one gets for free).

It reports and chooses nothing; the final stage reads PrivateTest's votes here only.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from trainables.data.ferplus import FER2013_COLUMNS, LEFT_OUT, VOTE_COLUMNS, majority7
from trainables.files import write_csv
from trainables.metrics import misclassified

ALL = "all"
AUDIT_FILE, ISSUES_FILE, ISSUES_SUMMARY_FILE, AUDIT_FIGURE = (
    "label_audit.csv", "label_issues.csv", "label_issues_summary.csv", "label_audit.png")
AUDIT_FILES = (AUDIT_FILE, ISSUES_FILE, ISSUES_SUMMARY_FILE, AUDIT_FIGURE)
TOP_K = (50, 100, 200)   # precision of cleanlab's ranking cut at its first k issues, besides all of them
MISTAKES_DRAWN = 12


def _share(part, whole) -> float:
    return float(part) / float(whole) if whole else float("nan")


def audit_table(probs: np.ndarray, y: np.ndarray, votes: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """One row over all images (`emotion` "all"), then one per FER2013 label: the figures of the module doc.

    `probs` (N, 7), `y` the FER2013 labels (N,), `votes` the FER+ vote counts (N, 10). Shares are
    NaN where there is nothing to count.
    """
    pred = np.asarray(probs).argmax(axis=1)
    y = np.asarray(y)
    ferplus, reasons = majority7(np.asarray(votes))
    groups = [(ALL, np.ones(len(y), dtype=bool)), *((c, y == i) for i, c in enumerate(classes))]
    return pd.DataFrame([_audit_row(name, pred[m], y[m], ferplus[m], reasons[m]) for name, m in groups])


def _audit_row(emotion: str, pred: np.ndarray, y: np.ndarray, ferplus: np.ndarray, reasons: np.ndarray) -> dict:
    has = ferplus >= 0
    agreed = has & (ferplus == y)
    wrong = pred != y
    judged = wrong & has   # mistakes FER+ can judge
    row = {"emotion": emotion, "n": len(y), "n_ferplus": int(has.sum()),
           **{f"n_{r}": int((reasons == r).sum()) for r in LEFT_OUT},
           "n_agreed": int(agreed.sum()), "label_agreement": _share(agreed.sum(), has.sum()),
           "accuracy": _share((~wrong).sum(), len(y)),
           "accuracy_ferplus": _share((has & (pred == ferplus)).sum(), has.sum()),
           "accuracy_agreed": _share((agreed & ~wrong).sum(), agreed.sum()),
           "accuracy_either": _share((~wrong | (has & (pred == ferplus))).sum(), len(y)),
           "mistakes": int(wrong.sum()), "mistakes_ferplus": int(judged.sum()),
           "ferplus_sides_model": _share((judged & (ferplus == pred)).sum(), judged.sum()),
           "ferplus_sides_label": _share((judged & (ferplus == y)).sum(), judged.sum()),
           "ferplus_sides_neither": _share((judged & (ferplus != pred) & (ferplus != y)).sum(), judged.sum())}
    row["noise_points"] = row["accuracy_either"] - row["accuracy"]
    return row


def find_issues(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """cleanlab's label issues, most likely first (positions in `y`).

    cleanlab, not a rule of our own: confident learning estimates each class pair's noise rate
    from the model's out-of-sample probabilities and flags that many of the least likely labels,
    which a fixed confidence threshold does not. One process: the split is small, and a pool of
    workers would be started inside a Ray worker or a test.
    """
    from cleanlab.filter import find_label_issues

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a class with too few images to estimate its noise rate
        return np.asarray(find_label_issues(np.asarray(y), np.asarray(probs, dtype=np.float64), n_jobs=1,
                                            return_indices_ranked_by="self_confidence"), dtype=np.int64)


def label_issues(probs: np.ndarray, y: np.ndarray, votes: np.ndarray, rows: np.ndarray,
                 classes: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """cleanlab's ranked issues (one row per flagged image) and their precision against FER+ (one row per flag).

    The issues: `rank`, the data `row`, the FER2013 `label`, the model's `predicted`, `label_quality`
    (the probability the model gives the label, cleanlab's self-confidence), the FER+ majority (an
    emotion, or why there is none) and whether it `disagrees` with the label, and the 10 vote counts.
    The summary's flags: `cleanlab` (all issues and its first TOP_K), `model_mistakes` (every image
    the model gets wrong) and `every_image` (the base rate). `precision_ferplus`: of the flagged images
    with a FER+ majority, the share where it differs from the FER2013 label; `lift` that over the base
    rate; `recall_ferplus` the share of all such disagreements the flag finds.
    """
    probs, y, votes = np.asarray(probs), np.asarray(y), np.asarray(votes)
    ranked = find_issues(probs, y)
    ferplus, reasons = majority7(votes)
    names = np.asarray(classes, dtype=object)
    majority = np.where(ferplus >= 0, names[np.maximum(ferplus, 0)], reasons)
    disagrees = (ferplus >= 0) & (ferplus != y)
    issues = pd.DataFrame({
        "rank": np.arange(1, len(ranked) + 1), "row": np.asarray(rows)[ranked], "label": names[y[ranked]],
        "predicted": names[probs[ranked].argmax(axis=1)], "label_quality": probs[ranked, y[ranked]],
        "ferplus_majority": majority[ranked],
        "disagrees": np.where(ferplus[ranked] >= 0, disagrees[ranked], pd.NA),
        **{f"votes_{c}": votes[ranked, j] for j, c in enumerate(VOTE_COLUMNS)}})
    flags = [("cleanlab", len(ranked), ranked), *(("cleanlab", k, ranked[:k]) for k in TOP_K if k < len(ranked)),
             ("model_mistakes", None, np.flatnonzero(probs.argmax(axis=1) != y)),
             ("every_image", None, np.arange(len(y)))]
    base = _share(disagrees.sum(), (ferplus >= 0).sum())
    summary = []
    for flag, top, idx in flags:
        judged = int((ferplus[idx] >= 0).sum())
        precision = _share(disagrees[idx].sum(), judged)
        summary.append({"flag": flag, "top": top if top is not None else len(idx), "n_flagged": len(idx),
                        "n_ferplus": judged, "precision_ferplus": precision, "base_rate": base,
                        "lift": precision / base if base else float("nan"),
                        "recall_ferplus": _share(disagrees[idx].sum(), disagrees.sum())})
    return issues, pd.DataFrame(summary)


def write_label_audit(out: Path, model: str, probs: np.ndarray, y: np.ndarray, votes: np.ndarray,
                      rows: np.ndarray, x: np.ndarray, classes: Sequence[str], *, split: str,
                      tta: str = "none", prefix: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write `<prefix>label_audit.csv`, `label_issues.csv`, `label_issues_summary.csv` and `label_audit.png` (the
    most confident mistakes with their FER+ votes; `x`: the split's uint8 images) under `out`; returns the audit
    table and cleanlab's summary."""
    from search.figures.plots import plot_vote_mistakes

    probs, y, votes = np.asarray(probs), np.asarray(y), np.asarray(votes)
    keys = {"model": model, "tta": tta}
    table = audit_table(probs, y, votes, classes)
    issues, summary = label_issues(probs, y, votes, rows, classes)
    for df, name in ((table, AUDIT_FILE), (issues, ISSUES_FILE), (summary, ISSUES_SUMMARY_FILE)):
        write_csv(_keyed(df.copy(), keys), out / f"{prefix}{name}")
    pred = probs.argmax(axis=1)
    shown = misclassified(probs, y, rows, classes).head(MISTAKES_DRAWN).index.to_numpy()
    plot_vote_mistakes(x[shown], folded_counts(votes[shown]), y[shown], pred[shown], probs[shown, pred[shown]],
                       np.asarray(rows)[shown], classes, out / f"{prefix}{AUDIT_FIGURE}",
                       title=f"most confident {split} mistakes of {model} (tta={tta}) with their FER+ votes")
    return table, summary


def folded_counts(votes: np.ndarray) -> np.ndarray:
    """Each image's FER+ vote counts over the 7 FER2013 emotions, then `other` (contempt, unknown, not-a-face):
    (N, 8) int, every vote kept (the figure shows what the annotators said, single votes too)."""
    votes = np.asarray(votes)
    other = np.delete(votes, list(FER2013_COLUMNS), axis=1).sum(axis=1, keepdims=True)
    return np.concatenate([votes[:, list(FER2013_COLUMNS)], other], axis=1)


def _keyed(df: pd.DataFrame, keys: dict) -> pd.DataFrame:
    for i, (k, v) in enumerate(keys.items()):
        df.insert(i, k, v)
    return df


def headline(table: pd.DataFrame, summary: pd.DataFrame) -> str:
    """The audit in three sentences, from the "all" row and cleanlab's precision, for the console."""
    a = table[table["emotion"] == ALL].iloc[0]
    c = summary[summary["flag"] == "cleanlab"].iloc[0]
    return (f"labels against FER+: accuracy {a['accuracy']:.1%} on the FER2013 labels, {a['accuracy_ferplus']:.1%} "
            f"on the FER+ majority ({a['n_ferplus']} of {a['n']} images), {a['accuracy_agreed']:.1%} where the two "
            f"agree ({a['n_agreed']}); of {a['mistakes_ferplus']} mistakes FER+ can judge it sides with the model on "
            f"{a['ferplus_sides_model']:.0%}, with the label on {a['ferplus_sides_label']:.0%}; counting a prediction "
            f"right when it matches either label gives {a['accuracy_either']:.1%}, "
            f"{100 * a['noise_points']:.1f} points above the headline. cleanlab flags {c['n_flagged']} images, "
            f"{c['precision_ferplus']:.0%} of them relabelled by FER+ (base rate {c['base_rate']:.0%})")


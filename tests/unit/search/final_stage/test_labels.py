"""The label audit (`search.final_stage.labels`): every figure against a count made by hand."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from search.final_stage.labels import ALL, AUDIT_FILES, audit_table, folded_counts, label_issues, write_label_audit
from trainables.data import EMOTIONS
from trainables.data.ferplus import VOTE_COLUMNS

E = {name: i for i, name in enumerate(EMOTIONS)}


def votes(**counts: int) -> list[int]:
    """One image's 10 FER+ vote counts by column name (neutral, happiness, ..., contempt, unknown, NF)."""
    return [counts.get(c, 0) for c in VOTE_COLUMNS]


# (FER2013 label, the model's prediction, FER+ votes): what each row tests, and its FER+ majority.
CASES = [
    ("happy", "happy", votes(happiness=9)),                         # 0 right, agreed
    ("happy", "surprise", votes(surprise=7, happiness=3)),          # 1 mistake, FER+ sides with the model
    ("sad", "neutral", votes(sadness=6, neutral=4)),                # 2 mistake, FER+ sides with the label
    ("sad", "angry", votes(fear=8, sadness=2)),                     # 3 mistake, FER+ says fear: neither
    ("angry", "angry", votes(anger=4, disgust=4, neutral=2)),       # 4 right, no majority (4 is not > 5)
    ("neutral", "sad", votes(contempt=6, neutral=4)),               # 5 mistake, contempt: left out
    ("fear", "surprise", votes(NF=10)),                             # 6 mistake, not a face: left out
    ("surprise", "surprise", votes(unknown=6, surprise=4)),         # 7 right, unknown: left out
    # 8 right, agreed: the three single votes are dropped (neutral 5 of 7 left); kept, 5 of 10 is no majority
    ("neutral", "neutral", votes(neutral=5, happiness=1, sadness=1, anger=1, fear=2)),
    ("happy", "neutral", votes(neutral=6, happiness=4)),            # 9 mistake, FER+ sides with the model
]


def _probs(preds: list[int], confidence: list[float] | None = None) -> np.ndarray:
    confidence = confidence or [0.7] * len(preds)
    out = np.array([[(1 - c) / 6] * 7 for c in confidence])
    out[np.arange(len(preds)), preds] = confidence
    return out


def _case_arrays():
    y = np.array([E[c[0]] for c in CASES])
    pred = [E[c[1]] for c in CASES]
    return _probs(pred), y, np.array([c[2] for c in CASES])


def test_the_audit_over_all_images_matches_the_hand_count():
    probs, y, v = _case_arrays()
    every = audit_table(probs, y, v, EMOTIONS).set_index("emotion").loc[ALL]
    assert every["n"] == 10
    assert (every["n_ferplus"], every["n_contempt"], every["n_unknown"], every["n_not_face"],
            every["n_no_majority"]) == (6, 1, 1, 1, 1)   # rows 0 1 2 3 8 9; 5; 7; 6; 4
    assert every["n_agreed"] == 3 and every["label_agreement"] == pytest.approx(3 / 6)   # rows 0 2 8
    assert every["accuracy"] == pytest.approx(4 / 10)             # rows 0 4 7 8
    assert every["accuracy_ferplus"] == pytest.approx(4 / 6)      # rows 0 1 8 9 of 0 1 2 3 8 9
    assert every["accuracy_agreed"] == pytest.approx(2 / 3)       # rows 0 8 of 0 2 8
    assert every["accuracy_either"] == pytest.approx(6 / 10)      # rows 0 4 7 8, and 1 9 by FER+
    assert every["noise_points"] == pytest.approx(0.2)
    assert (every["mistakes"], every["mistakes_ferplus"]) == (6, 4)   # 1 2 3 5 6 9; 1 2 3 9
    assert every["ferplus_sides_model"] == pytest.approx(2 / 4)   # rows 1 9
    assert every["ferplus_sides_label"] == pytest.approx(1 / 4)   # row 2
    assert every["ferplus_sides_neither"] == pytest.approx(1 / 4)  # row 3


def test_the_audit_per_emotion_groups_by_the_fer2013_label():
    probs, y, v = _case_arrays()
    table = audit_table(probs, y, v, EMOTIONS).set_index("emotion")
    assert list(table.index) == [ALL, *EMOTIONS]
    happy = table.loc["happy"]   # rows 0 1 9
    assert (happy["n"], happy["n_ferplus"], happy["n_agreed"], happy["mistakes_ferplus"]) == (3, 3, 1, 2)
    assert happy["accuracy"] == pytest.approx(1 / 3) and happy["ferplus_sides_model"] == 1.0
    sad = table.loc["sad"]       # rows 2 3
    assert (sad["accuracy"], sad["ferplus_sides_label"], sad["ferplus_sides_neither"]) == (0.0, 0.5, 0.5)
    assert table.loc["neutral", "n_contempt"] == 1 and table.loc["neutral", "accuracy_agreed"] == 1.0  # 5; 8
    assert table.loc["disgust", "n"] == 0 and math.isnan(table.loc["disgust", "accuracy"])
    assert table["n"].iloc[1:].sum() == table.loc[ALL, "n"]


def _issue_case():
    """140 images, 20 per emotion, the model 90% sure of each label but for 10 it is 95% sure are another
    emotion. FER+ relabels 6 of those 10 (to the model's reading) and 13 of the other 130; row 7 has no majority."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(7), 20)
    wrong = np.arange(3, 140, 14)                       # 10 images, every emotion among them
    pred = y.copy()
    pred[wrong] = (y[wrong] + 3) % 7
    probs = _probs(list(pred), [0.95 if i in wrong else 0.9 for i in range(140)])
    ferplus = y.copy()
    ferplus[wrong[:6]] = pred[wrong[:6]]
    others = rng.choice(np.setdiff1d(np.arange(140), np.r_[wrong, 7]), 13, replace=False)
    ferplus[others] = (y[others] + 1) % 7
    column = {i: VOTE_COLUMNS.index(c) for i, c in enumerate(
        ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"))}
    v = np.zeros((140, 10), dtype=np.int64)
    v[np.arange(140), [column[int(f)] for f in ferplus]] = 8
    v[7] = votes(anger=3, fear=3, neutral=4)           # no majority: left out of the precision
    return probs, y, v, wrong, others


def test_cleanlab_flags_the_confident_mistakes_and_its_precision_is_counted_against_ferplus():
    probs, y, v, wrong, others = _issue_case()
    rows = np.arange(1000, 1140)
    issues, summary = label_issues(probs, y, v, rows, EMOTIONS)
    assert sorted(issues["row"]) == sorted(rows[wrong])   # what confident learning flags here
    assert list(issues["rank"]) == list(range(1, 11))
    assert issues["label_quality"].is_monotonic_increasing
    assert issues["disagrees"].sum() == 6
    flags = summary.set_index("flag")
    assert list(summary["flag"]) == ["cleanlab", "model_mistakes", "every_image"]  # no top-k cut below 10
    base = 19 / 139                                       # 6 + 13 disagreements among the 139 with a majority
    assert flags.loc["every_image", "precision_ferplus"] == pytest.approx(base)
    assert flags.loc["cleanlab", "n_flagged"] == 10 and flags.loc["cleanlab", "n_ferplus"] == 10
    assert flags.loc["cleanlab", "precision_ferplus"] == pytest.approx(6 / 10)
    assert flags.loc["cleanlab", "lift"] == pytest.approx(0.6 / base)
    assert flags.loc["cleanlab", "recall_ferplus"] == pytest.approx(6 / 19)
    assert flags.loc["model_mistakes", "precision_ferplus"] == pytest.approx(6 / 10)


def test_the_written_audit_holds_every_file_and_the_figure_counts_every_vote(tmp_path):
    probs, y, v = _case_arrays()
    x = np.zeros((10, 48, 48), dtype=np.uint8)
    table, summary = write_label_audit(tmp_path, "top1-seed1", probs, y, v, np.arange(10), x, EMOTIONS,
                                       split="PrivateTest", prefix="m-")
    for name in AUDIT_FILES:
        assert (tmp_path / f"m-{name}").is_file(), name
    written = pd.read_csv(tmp_path / "m-label_audit.csv")
    assert list(written.columns[:3]) == ["model", "tta", "emotion"] and (written["model"] == "top1-seed1").all()
    assert written["accuracy"].iloc[0] == pytest.approx(table["accuracy"].iloc[0])
    counts = folded_counts(v)
    assert counts.shape == (10, 8) and (counts.sum(axis=1) == v.sum(axis=1)).all()   # no vote lost
    assert counts[8].tolist() == [1, 0, 2, 1, 1, 0, 5, 0]   # angry .. neutral, then other
    assert counts[5, 7] == 6 and counts[6, 7] == 10          # contempt, not-a-face: "other"

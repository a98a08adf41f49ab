"""Scoring the final runs (`search.final_stage.scoring`) on hand-made probabilities: duplicate masks, metric rows,
seed mean and sample std, the two ensembles, metrics.csv's order, per_class.csv, and the analysed model.

Three classes, four PrivateTest images, three runs of two configurations and two TTA modes; nothing is trained
and Ray is not involved.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from search.final_stage.candidates import Candidate
from search.final_stage.retrain import FinalRun
from search.final_stage.scoring import (
    ANALYSIS_TTA,
    METRIC_COLUMNS,
    choose_analysed,
    duplicate_masks,
    ensemble_members,
    metrics_table,
    per_class_table,
    score_models,
    score_split,
    summarize_seeds,
)
from trainables.calibration import CALIBRATION_COLUMNS
from trainables.config import TrialConfig
from trainables.data import FERData, Split
from trainables.metrics import SCALAR_METRICS

CLASSES = ("a", "b", "c")
TTAS = ("none", "flip")


def _images(*values: int) -> torch.Tensor:
    """One flat 48x48 image per value (pixel-identical exactly where the values are equal)."""
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1).expand(-1, 48, 48).contiguous()


def _split(values, y) -> Split:
    return Split(_images(*values), torch.tensor(y, dtype=torch.int64), torch.arange(len(y), dtype=torch.int64))


# PrivateTest images 10, 11, 12, 13: image 10 is also in Training, 11 in PublicTest, 12 in both, 13 in neither.
DATA = FERData(CLASSES, {
    "Training": _split([10, 12, 20, 21], [0, 2, 1, 1]),
    "PublicTest": _split([11, 12, 30, 31], [0, 1, 2, 0]),
    "PrivateTest": _split([10, 11, 12, 13], [0, 1, 2, 0]),
}, source="hand-made")


def _confident(preds, p: float) -> np.ndarray:
    """Rows giving probability `p` to the predicted class and the rest equally to the others."""
    out = np.full((len(preds), 3), (1 - p) / 2)
    out[np.arange(len(preds)), preds] = p
    return out


# PrivateTest probabilities ("none"); true classes 0, 1, 2, 0.
TEST = {
    "top1-a-seed1": np.array([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6], [0.2, 0.6, 0.2]]),  # 0 1 2 1
    "top1-a-seed2": np.array([[0.8, 0.1, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]]),  # 0 0 2 0
    "top2-b-seed1": np.array([[0.35, 0.4, 0.25], [0.1, 0.8, 0.1], [0.07, 0.9, 0.03], [0.5, 0.3, 0.2]]),  # 1 1 1 0
}
# With "flip" every run is right on every PrivateTest image.
FLIP_TEST = _confident([0, 1, 2, 0], 0.8)
# PublicTest probabilities without TTA: accuracies 0.5, 0.75 and 0.5; with "flip" every run is right.
FLIP_VAL = _confident([0, 1, 2, 0], 0.6)
VAL = {
    "top1-a-seed1": _confident([0, 1, 0, 1], 0.8),
    "top1-a-seed2": _confident([0, 1, 2, 1], 0.9),
    "top2-b-seed1": _confident([0, 0, 2, 1], 0.7),
}


def _candidate(rank: int, trial_id: str, lr: float, search_val_acc: float) -> Candidate:
    return Candidate(rank=rank, trial_id=trial_id, config=TrialConfig(lr=lr), search_val_acc=search_val_acc)


def _run(cand: Candidate, seed: int, best_epoch: int, val_acc: float) -> FinalRun:
    name = f"{cand.name}-seed{seed}"
    return FinalRun(candidate=cand, seed=seed, weights=Path(f"/nowhere/{name}.pt"), best_epoch=best_epoch,
                    val_acc=val_acc, val_probs={"none": VAL[name], "flip": FLIP_VAL})


A, B = _candidate(1, "a", 0.01, 0.625), _candidate(2, "b", 0.02, 0.5)
RUNS = [_run(A, 1, 3, 0.5), _run(A, 2, 5, 0.75), _run(B, 1, 4, 0.5)]
PROBS = {**{(name, "none"): p for name, p in TEST.items()}, **{(name, "flip"): FLIP_TEST for name in TEST}}


@pytest.fixture(scope="module")
def scored():
    return score_models(RUNS, PROBS, DATA, ttas=TTAS, beta=1.0)


def _row(rows, kind: str, tta: str, config: str | None = None, seed: int | None = None) -> dict:
    (row,) = [r for r in rows if r["kind"] == kind and r["tta"] == tta and config in (None, r["config"])
              and seed in (None, r.get("seed"))]
    return row


# --------------------------------------------------------------------------- duplicates

def test_duplicate_masks_check_each_split_against_the_earlier_ones():
    masks = duplicate_masks(DATA, "PrivateTest")
    assert sorted(masks) == ["PublicTest", "Training"]
    assert masks["Training"].tolist() == [True, False, True, False]
    assert masks["PublicTest"].tolist() == [False, True, True, False]
    assert list(duplicate_masks(DATA, "PublicTest")) == ["Training"]
    assert duplicate_masks(DATA, "PublicTest")["Training"].tolist() == [False, True, False, False]
    assert duplicate_masks(DATA, "Training") == {}
    # A split that was not loaded is not checked against.
    without_training = FERData(CLASSES, {k: DATA.splits[k] for k in ("PublicTest", "PrivateTest")}, source="x")
    assert list(duplicate_masks(without_training, "PrivateTest")) == ["PublicTest"]


def test_score_split_counts_duplicates_and_leaves_them_out_of_accuracy_dedup():
    probs = TEST["top1-a-seed2"]  # right on images 0, 2 and 3 (not 1)
    m = score_split(probs, DATA.test, beta=1.0, class_names=CLASSES, duplicates=duplicate_masks(DATA, "PrivateTest"))
    assert m["accuracy"] == 0.75 and m["n_images"] == 4
    assert (m["n_duplicates"], m["n_dup_training"], m["n_dup_publictest"]) == (3, 2, 2)
    assert m["accuracy_dedup"] == 1.0  # only image 3 is left, and it is right
    m = score_split(TEST["top1-a-seed1"], DATA.test, beta=1.0, class_names=CLASSES,
                    duplicates={"Training": np.array([True, False, True, False])})
    # Only Training checked: images 1 and 3 remain, 1 right and 3 wrong.
    assert (m["n_duplicates"], m["n_dup_training"], m["n_dup_publictest"]) == (2, 2, 0)
    assert m["accuracy_dedup"] == 0.5
    # No duplicate check at all: no dedup figures.
    m = score_split(TEST["top1-a-seed1"], DATA.test, beta=1.0, class_names=CLASSES)
    assert "accuracy_dedup" not in m and "n_duplicates" not in m


def test_accuracy_dedup_is_nan_when_every_image_is_a_duplicate():
    every = {"Training": np.ones(4, dtype=bool)}
    m = score_split(TEST["top1-a-seed1"], DATA.test, beta=1.0, class_names=CLASSES, duplicates=every)
    assert m["n_duplicates"] == 4 and math.isnan(m["accuracy_dedup"])


# --------------------------------------------------------------------------- ensembles

def test_ensemble_best_takes_each_configurations_best_public_test_run():
    members = ensemble_members(RUNS)
    assert [r.name for r in members["ensemble_all"]] == ["top1-a-seed1", "top1-a-seed2", "top2-b-seed1"]
    assert [r.name for r in members["ensemble_best"]] == ["top1-a-seed2", "top2-b-seed1"]
    # A tie keeps the first run of the configuration.
    tied = [_run(A, 1, 3, 0.75), _run(A, 2, 5, 0.75)]
    assert [r.name for r in ensemble_members(tied)["ensemble_best"]] == ["top1-a-seed1"]
    # The members keep the configurations' rank order, whatever their scores.
    ranked = [_run(A, 1, 3, 0.5), _run(B, 1, 4, 0.9)]
    assert [r.name for r in ensemble_members(ranked)["ensemble_best"]] == ["top1-a-seed1", "top2-b-seed1"]


def test_ensembles_average_their_members_softmax_outputs(scored):
    rows, full = scored
    best = full["ensemble_best", "none"]["probs"]
    # Image 2: (0.1 + 0.07, 0.1 + 0.9, 0.8 + 0.03) / 2 -> b wins, wrongly (true c); with the third run c wins.
    np.testing.assert_allclose(best[2], [0.085, 0.5, 0.415])
    np.testing.assert_allclose(full["ensemble_all", "none"]["probs"][2], [0.37 / 3, 1.2 / 3, 1.43 / 3])
    np.testing.assert_allclose(full["ensemble_all", "none"]["probs"][1], [0.8 / 3, 1.8 / 3, 0.4 / 3])
    # ensemble_all is right on all four images; ensemble_best misses image 2 (not a duplicate-free one).
    assert full["ensemble_all", "none"]["accuracy"] == 1.0
    assert full["ensemble_best", "none"]["accuracy"] == 0.75
    assert full["ensemble_best", "none"]["accuracy_dedup"] == 1.0
    ens = _row(rows, "ensemble_best", "none")
    assert ens["config"] == "top1-a-seed2+top2-b-seed1" and ens["n_runs"] == 2
    assert _row(rows, "ensemble_all", "none")["config"] == "top1-a-seed1+top1-a-seed2+top2-b-seed1"
    assert _row(rows, "ensemble_all", "none")["n_runs"] == 3


# --------------------------------------------------------------------------- metric rows

def test_score_models_gives_one_row_per_model_and_tta_with_hand_computed_numbers(scored):
    rows, full = scored
    assert len(rows) == 5 * 2 and set(full) == {(n, t) for n in [*TEST, "ensemble_all", "ensemble_best"]
                                                 for t in TTAS}
    expected = {  # name: (PrivateTest accuracy, accuracy_dedup, PublicTest accuracy), without TTA
        "top1-a-seed1": (0.75, 0.0, 0.5), "top1-a-seed2": (0.75, 1.0, 0.75), "top2-b-seed1": (0.5, 1.0, 0.5),
        "ensemble_all": (1.0, 1.0, 0.75), "ensemble_best": (0.75, 1.0, 0.75)}
    for name, (acc, dedup, val) in expected.items():
        m = full[name, "none"]
        assert (m["accuracy"], m["accuracy_dedup"], m["val_acc"]) == (acc, dedup, val), name
        assert (m["n_duplicates"], m["n_dup_training"], m["n_dup_publictest"]) == (3, 2, 2), name
        assert full[name, "flip"]["accuracy"] == 1.0 and full[name, "flip"]["val_acc"] == 1.0, name
    run = _row(rows, "run", "none", "top1-a", seed=1)
    assert run["trial_id"] == "a" and run["lr"] == 0.01 and run["best_epoch"] == 3
    assert run["search_val_acc"] == 0.625 and run["n_runs"] == 1 and run["beta"] == 1.0 and run["n_images"] == 4
    assert run["accuracy"] == 0.75 and run["val_acc"] == 0.5
    # Every row carries every scalar metric, the dedup figures and the calibration ones.
    for row in rows:
        assert set(SCALAR_METRICS) | {"accuracy_dedup", "n_duplicates"} | set(CALIBRATION_COLUMNS) <= set(row)
    # Top-3 of three classes is always right; top-2 of top2-b-seed1 misses only image 2 (c is its last choice).
    assert full["top2-b-seed1", "none"]["top3_accuracy"] == 1.0
    assert full["top2-b-seed1", "none"]["top2_accuracy"] == 0.75


def test_summarize_seeds_gives_the_mean_and_sample_std_over_seeds(scored):
    rows, _ = scored
    summary = summarize_seeds(rows)
    assert [(r["kind"], r["config"], r["tta"]) for r in summary] == [
        ("mean", "top1-a", "none"), ("std", "top1-a", "none"), ("mean", "top2-b", "none"), ("std", "top2-b", "none"),
        ("mean", "top1-a", "flip"), ("std", "top1-a", "flip"), ("mean", "top2-b", "flip"), ("std", "top2-b", "flip")]
    mean, std = _row(summary, "mean", "none", "top1-a"), _row(summary, "std", "none", "top1-a")
    # Seeds 1 and 2: best epoch 3 and 5, PublicTest 0.5 and 0.75, accuracy_dedup 0 and 1, accuracy 0.75 both.
    assert (mean["best_epoch"], mean["val_acc"], mean["accuracy_dedup"], mean["accuracy"]) == (4.0, 0.625, 0.5, 0.75)
    assert std["best_epoch"] == pytest.approx(math.sqrt(2))          # sample std (n - 1), not 1.0
    assert std["val_acc"] == pytest.approx(math.sqrt(2) * 0.125)
    assert std["accuracy_dedup"] == pytest.approx(math.sqrt(0.5))     # not 0.5
    assert std["accuracy"] == 0.0
    assert mean["n_runs"] == std["n_runs"] == 2 and mean["trial_id"] == "a" and mean["lr"] == 0.01
    assert (mean["n_duplicates"], mean["n_dup_training"], mean["n_dup_publictest"]) == (3, 2, 2)
    assert mean["search_val_acc"] == 0.625 and mean["n_images"] == 4 and mean["beta"] == 1.0
    # One seed: the mean is that run, the std is blank.
    one_mean, one_std = _row(summary, "mean", "none", "top2-b"), _row(summary, "std", "none", "top2-b")
    assert one_mean["n_runs"] == 1 and one_mean["accuracy"] == 0.5 and one_mean["best_epoch"] == 4.0
    assert math.isnan(one_std["accuracy"]) and math.isnan(one_std["val_acc"])


def test_metrics_table_orders_runs_mean_std_per_configuration_then_the_ensembles(scored):
    rows, _ = scored
    table = metrics_table(rows, TTAS)
    assert list(table.columns) == METRIC_COLUMNS and len(table) == 10 + 8
    got = [(kind, "" if kind.startswith("ensemble") else config, None if pd.isna(seed) else int(seed), tta)
           for kind, config, seed, tta in zip(table["kind"], table["config"], table["seed"], table["tta"])]
    assert got == [
        ("run", "top1-a", 1, "none"), ("run", "top1-a", 1, "flip"), ("run", "top1-a", 2, "none"),
        ("run", "top1-a", 2, "flip"), ("mean", "top1-a", None, "none"), ("mean", "top1-a", None, "flip"),
        ("std", "top1-a", None, "none"), ("std", "top1-a", None, "flip"),
        ("run", "top2-b", 1, "none"), ("run", "top2-b", 1, "flip"), ("mean", "top2-b", None, "none"),
        ("mean", "top2-b", None, "flip"), ("std", "top2-b", None, "none"), ("std", "top2-b", None, "flip"),
        ("ensemble_all", "", None, "none"), ("ensemble_all", "", None, "flip"),
        ("ensemble_best", "", None, "none"), ("ensemble_best", "", None, "flip")]
    # Seeds are integers, blank (not NaN floats) on the other rows.
    assert str(table["seed"].dtype) == "Int64" and table["seed"].isna().sum() == 12
    assert table.loc[table["kind"] == "run", "seed"].tolist() == [1, 1, 2, 2, 1, 1]
    assert table.loc[0, "accuracy"] == 0.75 and table.loc[17, "accuracy"] == 1.0  # ensemble_best with flip


def test_metrics_table_ranks_configurations_numerically_not_as_text():
    def row(rank: int) -> dict:
        return {"kind": "run", "config": f"top{rank}-t{rank}", "trial_id": f"t{rank}", "seed": 1, "tta": "none",
                "lr": 0.1, "best_epoch": 1, "val_acc": 0.5, "search_val_acc": 0.5, "n_runs": 1,
                **dict.fromkeys(SCALAR_METRICS, 0.5), **dict.fromkeys(CALIBRATION_COLUMNS, 0.1),
                "accuracy_dedup": 0.5, "n_duplicates": 0, "n_dup_training": 0, "n_dup_publictest": 0,
                "n_images": 4, "beta": 1.0}
    ensemble = {**row(1), "kind": "ensemble_all", "config": "top10-t10-seed1+top2-t2-seed1", "seed": None,
                "trial_id": None}
    table = metrics_table([ensemble, row(10), row(2)], ["none"])
    assert table["kind"].tolist() == ["run", "mean", "std", "run", "mean", "std", "ensemble_all"]
    assert table["config"].tolist()[:6] == ["top2-t2"] * 3 + ["top10-t10"] * 3


def test_per_class_table_has_one_row_per_model_tta_and_class(scored):
    _, full = scored
    table = per_class_table(full)
    assert list(table.columns) == ["model", "tta", "class", "precision", "recall", "fbeta", "support"]
    assert len(table) == 5 * 2 * 3
    rows = table[(table["model"] == "top2-b-seed1") & (table["tta"] == "none")].set_index("class")
    # Predictions b, b, b, a for true a, b, c, a: a 1 of 2 right (1 of 1 predicted), b 1 of 1 (1 of 3), c none.
    assert rows["support"].tolist() == [2, 1, 1]
    assert rows["recall"].tolist() == [0.5, 1.0, 0.0]
    assert rows["precision"].tolist() == pytest.approx([1.0, 1 / 3, 0.0])
    assert rows["fbeta"].tolist() == pytest.approx([2 / 3, 0.5, 0.0])


# --------------------------------------------------------------------------- the analysed model

def test_choose_analysed_takes_the_best_public_test_accuracy_without_tta_and_single_runs_win_ties(scored):
    _, full = scored
    # PublicTest: runs 0.5, 0.75, 0.5; both ensembles 0.75 -> the run top1-a-seed2, not an ensemble.
    assert choose_analysed(full, RUNS) == "top1-a-seed2"
    assert ANALYSIS_TTA == "none"

    def val(**accs):
        names = [*TEST, "ensemble_all", "ensemble_best"]
        out = {(n, "none"): {"val_acc": accs.get(n.replace("-", "_"), 0.1)} for n in names}
        out.update({(n, "flip"): {"val_acc": 0.99} for n in names})  # ignored: the analysis has no TTA
        return out

    assert choose_analysed(val(ensemble_best=0.8, top1_a_seed1=0.7), RUNS) == "ensemble_best"
    assert choose_analysed(val(ensemble_all=0.8, ensemble_best=0.8), RUNS) == "ensemble_all"
    assert choose_analysed(val(top2_b_seed1=0.6, top1_a_seed1=0.6, ensemble_all=0.6), RUNS) == "top1-a-seed1"


def test_truncated_runs_are_marked_and_left_out_of_the_ensembles_and_the_means():
    """A run the time budget cut mid-schedule (never annealed) stays in metrics.csv, marked, but the ensembles
    and the seed means are of the runs that finished their schedule; when every run was cut, of them all."""
    import dataclasses

    cut = [dataclasses.replace(RUNS[0], truncated=True), RUNS[1], RUNS[2]]
    members = ensemble_members(cut)
    assert [r.name for r in members["ensemble_all"]] == ["top1-a-seed2", "top2-b-seed1"]
    rows, _ = score_models(cut, PROBS, DATA, ttas=TTAS, beta=1.0)
    assert _row(rows, "run", "none", seed=1, config="top1-a")["truncated"] is True
    assert _row(rows, "run", "none", seed=2)["truncated"] is False
    table = metrics_table(rows, TTAS)
    mean_a = table[(table["kind"] == "mean") & (table["config"] == "top1-a") & (table["tta"] == "none")].iloc[0]
    assert mean_a["n_runs"] == 1 and mean_a["val_acc"] == _row(rows, "run", "none", seed=2)["val_acc"]
    every = [dataclasses.replace(r, truncated=True) for r in RUNS]
    assert [r.name for r in ensemble_members(every)["ensemble_all"]] == [r.name for r in RUNS]


# --------------------------------------------------------------------------- the distilled student

def test_the_student_is_scored_alone_and_joins_no_ensemble_and_no_mean():
    student = FinalRun(candidate=Candidate(rank=1, trial_id="a", config=TrialConfig(lr=0.001), search_val_acc=0.625,
                                           prefix="distilled-"),
                       seed=2, weights=Path("/nowhere/distilled-top1-a-seed2.pt"), best_epoch=2, val_acc=1.0,
                       val_probs={"none": FLIP_VAL, "flip": FLIP_VAL})
    probs = {**PROBS, (student.name, "none"): FLIP_TEST, (student.name, "flip"): FLIP_TEST}
    rows, full = score_models(RUNS, probs, DATA, ttas=TTAS, beta=1.0, student=student)
    plain, _ = score_models(RUNS, PROBS, DATA, ttas=TTAS, beta=1.0)
    row = _row(rows, "distilled", "none")
    assert (row["config"], row["seed"], row["n_runs"], row["lr"]) == ("distilled-top1-a-seed2", 2, 1, 0.001)
    assert row["accuracy"] == 1.0 and row["val_acc"] == 1.0
    assert full["distilled", "none"]["accuracy"] == 1.0
    # everything else is as without it
    for kind in ("ensemble_all", "ensemble_best", "run"):
        assert [r["accuracy"] for r in rows if r["kind"] == kind] == [r["accuracy"] for r in plain if r["kind"] == kind]
    table = metrics_table(rows, TTAS)
    assert list(table["kind"].iloc[-2:]) == ["distilled", "distilled"]  # last, after the ensembles
    assert len(table[table["kind"] == "mean"]) == len(metrics_table(plain, TTAS).query("kind == 'mean'"))
    # the best PublicTest accuracy: the error analysis describes the student
    assert choose_analysed(full, RUNS, student) == "distilled"
    assert choose_analysed(full, RUNS) != "distilled"

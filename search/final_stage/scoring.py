"""Scoring the final runs on PrivateTest: every run, the per-configuration mean and spread, two ensembles and
the distilled student.

Each TTA mode gets its own rows. Metrics are scikit-learn's (`trainables.metrics`); this
module turns them into the final stage's tables and picks the model the error analysis
describes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from search.final_stage.retrain import FinalRun
from trainables.calibration import CALIBRATION_COLUMNS, calibrate
from trainables.data import FERData, Split, duplicate_mask
from trainables.inference import predict
from trainables.metrics import SCALAR_METRICS, classification_metrics, ensemble_probs, masked_accuracy, normalize_rows
from trainables.weights import load_weights

# The error analysis (confused pairs, mistakes) is done without test-time augmentation.
ANALYSIS_TTA = "none"
KINDS = ("run", "mean", "std", "ensemble_all", "ensemble_best", "distilled")
DISTILLED = "distilled"  # the student's key in the full metrics (and its rows' kind)
DEDUP_COLUMNS = ["accuracy_dedup", "n_duplicates", "n_dup_training", "n_dup_publictest"]
METRIC_COLUMNS = ["kind", "config", "trial_id", "seed", "lr", "tta", "n_runs", "best_epoch", "truncated", "val_acc",
                  "search_val_acc", *SCALAR_METRICS, *DEDUP_COLUMNS, *CALIBRATION_COLUMNS, "n_images", "beta"]


def duplicate_masks(data: FERData, split: str) -> dict[str, np.ndarray]:
    """Per earlier split, which images of `split` are pixel-identical to one of its images.

    PrivateTest is checked against Training (which fitted the weights) and PublicTest
    (which chose the models); PublicTest against Training; Training against nothing.
    """
    earlier = {"PublicTest": ("Training",), "PrivateTest": ("Training", "PublicTest")}.get(split, ())
    return {name: duplicate_mask(data.splits[split], data.splits[name]).numpy()
            for name in earlier if name in data.splits}


def score_split(probs: np.ndarray, split: Split, *, beta: float, class_names: Sequence[str],
                duplicates: dict[str, np.ndarray] | None = None) -> dict:
    """`classification_metrics` of `probs` on `split`, plus accuracy without the duplicated images.

    `duplicates` (from `duplicate_masks`) gives `n_dup_training` and `n_dup_publictest`, and
    `accuracy_dedup` leaves out every image duplicated in either (`n_duplicates` of them).
    """
    y = split.y.numpy()
    m = classification_metrics(y, probs, beta=beta, class_names=class_names)
    if duplicates:
        union = np.logical_or.reduce(list(duplicates.values()))
        m["n_duplicates"] = int(union.sum())
        for name in ("Training", "PublicTest"):
            m[f"n_dup_{name.lower()}"] = int(duplicates[name].sum()) if name in duplicates else 0
        m["accuracy_dedup"] = masked_accuracy(y, probs, ~union)
    return m


def predict_runs(runs: Sequence[FinalRun], data: FERData, *, ttas: Sequence[str],
                 device: torch.device) -> dict[tuple[str, str], np.ndarray]:
    """PrivateTest probabilities of every saved run, reloaded from its weights file, per TTA mode."""
    probs = {}
    for run in runs:
        model, _ = load_weights(run.weights, device=device)
        for tta in ttas:
            probs[run.name, tta] = predict(model, data.test.x, device=device, tta=tta).numpy()
    return probs


def complete_runs(runs: Sequence[FinalRun]) -> list[FinalRun]:
    """The runs that finished their schedule, or every run when none did (a budget that cut them all)."""
    return [r for r in runs if not r.truncated] or list(runs)


def ensemble_members(runs: Sequence[FinalRun]) -> dict[str, list[FinalRun]]:
    """The two ensembles, of the runs that finished their schedule (`complete_runs`): all of them, and the
    best of each configuration by its PublicTest accuracy."""
    runs = complete_runs(runs)
    best: dict[str, FinalRun] = {}
    for run in runs:
        key = run.candidate.name
        if key not in best or run.val_acc > best[key].val_acc:
            best[key] = run
    return {"ensemble_all": list(runs), "ensemble_best": list(best.values())}


def val_accuracy(members: Sequence[FinalRun], val_y: np.ndarray, tta: str = ANALYSIS_TTA) -> tuple[np.ndarray, float]:
    """The PublicTest probabilities of `members` as one model (their softmax average) and its accuracy."""
    val = ensemble_probs([m.val_probs[tta] for m in members])
    return val, float((val.argmax(1) == val_y).mean())


def score_models(runs: Sequence[FinalRun], probs: dict, data: FERData, *, ttas: Sequence[str],
                 beta: float, student: FinalRun | None = None) -> tuple[list[dict], dict[tuple[str, str], dict]]:
    """Score every run, ensemble and the `student` on PrivateTest per TTA mode: metric rows, and each model's full
    metrics (the student's under DISTILLED; it is in no ensemble and no seed mean)."""
    dup = duplicate_masks(data, "PrivateTest")
    val_y, test_y = data.val.y.numpy(), data.test.y.numpy()
    models = [(run.name, {"kind": "run", "config": run.candidate.name, "trial_id": run.candidate.trial_id,
                          "seed": run.seed, "lr": run.lr, "n_runs": 1, "best_epoch": run.best_epoch,
                          "truncated": run.truncated, "search_val_acc": run.candidate.search_val_acc}, [run])
              for run in runs]
    for kind, members in ensemble_members(runs).items():
        models.append((kind, {"kind": kind, "config": "+".join(r.name for r in members), "n_runs": len(members)},
                       members))
    if student is not None:
        models.append((DISTILLED, {"kind": DISTILLED, "config": student.name, "trial_id": student.candidate.trial_id,
                                   "seed": student.seed, "lr": student.lr, "n_runs": 1,
                                   "best_epoch": student.best_epoch, "truncated": student.truncated,
                                   "search_val_acc": student.candidate.search_val_acc}, [student]))
    rows, full = [], {}
    for tta in ttas:
        for name, ids, members in models:
            val, acc = val_accuracy(members, val_y, tta)
            test = ensemble_probs([probs[m.name, tta] for m in members])
            m = score_split(test, data.test, beta=beta, class_names=data.classes, duplicates=dup)
            # temperature fitted on this model's PublicTest probabilities (same TTA), measured on PrivateTest
            cal = calibrate(val, val_y, test, test_y)
            m.update(val_acc=acc, probs=test, **cal)
            full[name, tta] = m
            rows.append({**ids, "tta": tta, "val_acc": m["val_acc"], **{k: m[k] for k in SCALAR_METRICS},
                         **{k: m[k] for k in DEDUP_COLUMNS}, **{k: m[k] for k in CALIBRATION_COLUMNS},
                         "n_images": m["n_images"], "beta": beta})
    return rows, full


def summarize_seeds(rows: list[dict]) -> list[dict]:
    """A mean and a (sample) std row per configuration and TTA mode over its seeds; std is blank for one seed.

    Runs cut before their schedule ended are left out while any run finished its schedule (`complete_runs`)."""
    runs = pd.DataFrame([r for r in rows if r["kind"] == "run"])
    if "truncated" in runs and not runs["truncated"].astype(bool).all():
        runs = runs[~runs["truncated"].astype(bool)]
    numeric = ["best_epoch", "val_acc", "search_val_acc", *SCALAR_METRICS, "accuracy_dedup", *CALIBRATION_COLUMNS]
    out = []
    for (config, trial_id, tta), group in runs.groupby(["config", "trial_id", "tta"], sort=False):
        for kind, values in (("mean", group[numeric].mean()), ("std", group[numeric].std(ddof=1))):
            out.append({"kind": kind, "config": config, "trial_id": trial_id, "tta": tta, "n_runs": len(group),
                        **values.to_dict(), "lr": group["lr"].iloc[0],
                        **{k: group[k].iloc[0] for k in DEDUP_COLUMNS[1:]},
                        "n_images": group["n_images"].iloc[0], "beta": group["beta"].iloc[0]})
    return out


def metrics_table(rows: list[dict], ttas: Sequence[str]) -> pd.DataFrame:
    """metrics.csv: per configuration its runs, mean and std rows; the ensembles last; TTA modes side by side."""
    df = pd.DataFrame(rows + summarize_seeds(rows)).reindex(columns=METRIC_COLUMNS)
    rank = df["config"].str.extract(r"^top(\d+)-", expand=False).astype(float)
    df["_rank"] = np.where(df["kind"].str.startswith("ensemble") | (df["kind"] == DISTILLED), np.inf, rank)
    df["_kind"] = df["kind"].map(KINDS.index)
    df["_tta"] = df["tta"].map(list(ttas).index)
    df = df.sort_values(["_rank", "_kind", "seed", "_tta"], kind="stable", na_position="first")
    df["seed"] = df["seed"].astype("Int64")  # blank, not NaN-as-float, on mean/std/ensemble rows
    return df.drop(columns=["_rank", "_kind", "_tta"]).reset_index(drop=True)


def per_class_table(full: dict[tuple[str, str], dict]) -> pd.DataFrame:
    """per_class.csv: precision, recall, F-beta and support per class, for every run and ensemble, per TTA."""
    parts = [m["per_class"].assign(model=name, tta=tta) for (name, tta), m in full.items()]
    df = pd.concat(parts, ignore_index=True)
    return df[["model", "tta", "class", "precision", "recall", "fbeta", "support"]]


def choose_analysed(full: dict[tuple[str, str], dict], runs: Sequence[FinalRun],
                    student: FinalRun | None = None) -> str:
    """The model the error analysis describes: best PublicTest accuracy without TTA (single runs win ties, then
    the ensembles, then the student)."""
    names = [r.name for r in runs] + list(ensemble_members(runs)) + ([DISTILLED] if student else [])
    return max(names, key=lambda n: full[n, ANALYSIS_TTA]["val_acc"])


def confusion_table(model: str, full: dict, classes: Sequence[str], ttas: Sequence[str]) -> pd.DataFrame:
    """confusion_matrix.csv: counts then row shares, rows = true class, one block per TTA mode."""
    blocks = []
    for tta in ttas:
        cm = full[model, tta]["confusion"]
        for value, matrix in (("count", cm), ("share", normalize_rows(cm))):
            # object dtype: counts stay integers in the CSV although shares share their columns
            block = pd.DataFrame(matrix.astype(object), columns=list(classes))
            block.insert(0, "true", list(classes))
            block.insert(0, "value", value)
            block.insert(0, "tta", tta)
            block.insert(0, "model", model)
            blocks.append(block)
    return pd.concat(blocks, ignore_index=True)

"""`python -m search.evaluate --model <weights.pt> --data <fer2013 data>`: evaluate a saved model.

Loads weights written by the final stage (`results/<name>/final/models/*.pt`, read
with `weights_only=True`), rebuilds the model from the config stored beside its
state_dict, and prints the final stage's metrics on one split (PrivateTest by
default) of any data `load_fer2013` reads, for each test-time augmentation asked
for. Besides `search.final`, this is the only command that may read PrivateTest.

`--groups FILE` adds a per-group bias report (see `search.bias.groups`): accuracy and macro
recall per group of the user's own attributes, with bootstrap intervals and the gap between
the worst and the best group, written as a CSV and a PNG.

With FER2013 labels and the FER+ votes (`fer2013new.csv` beside --data, or --ferplus), it also
audits the labels (see `search.final_stage.labels`): accuracy against FER2013 and against the
FER+ majority, which side FER+ takes on each mistake, and cleanlab's label issues with their
precision against FER+, printed and written beside the groups report.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from search.bias.groups import (
    N_BOOTSTRAP,
    GroupLabels,
    default_out_dir,
    format_groups,
    group_report,
    labels_for_split,
    read_groups,
    write_group_report,
)
from search.final_stage.labels import ALL, headline, write_label_audit
from search.final_stage.scoring import DEDUP_COLUMNS, duplicate_masks, score_split
from search.tuning.cli import Parser, run_cli
from trainables.calibration import CALIBRATION_COLUMNS, compare, fit_temperature
from trainables.data import EMOTIONS, SPLITS, FERData, load_fer2013
from trainables.device import pick_device
from trainables.errors import UserError
from trainables.inference import TTA_MODES, predict
from trainables.metrics import SCALAR_METRICS, confused_pairs
from trainables.weights import load_weights

# --------------------------------------------------------------------------- evaluation

def load_eval_data(path: str, split: str, *, labels: str, ferplus: str | None, seed: int = 0) -> FERData:
    """The split to evaluate, and the splits before it (to find the images duplicated in them).

    `seed` must be the experiment's: an image folder without `val/` draws PublicTest from
    `train/` with it.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; choose from {list(SPLITS)}")
    return load_fer2013(path, splits=SPLITS[: SPLITS.index(split) + 1], labels=labels, ferplus_path=ferplus,
                        seed=seed, votes=True)


def format_metrics(rows: pd.DataFrame) -> str:
    """The scalar metrics as a fixed-width table (4 decimals)."""
    return rows.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def predict_modes(model: nn.Module, data: FERData, split: str, *, ttas: Sequence[str],
                  device: torch.device) -> dict[str, np.ndarray]:
    """Softmax probabilities of `model` on `split`, once per TTA mode."""
    return {tta: predict(model, data.splits[split].x, device=device, tta=tta).numpy() for tta in ttas}


def evaluate_model(probs: Mapping[str, np.ndarray], data: FERData, split: str, *,
                   beta: float) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Score a model's probabilities on `split` (from `predict_modes`, one entry per TTA mode): a table (one
    row per mode) and the full metrics per mode."""
    target = data.splits[split]
    dup = duplicate_masks(data, split)
    rows, full = [], {}
    for tta, mode_probs in probs.items():
        m = score_split(mode_probs, target, beta=beta, class_names=data.classes, duplicates=dup)
        full[tta] = m
        shown = data.test_name if split == "PrivateTest" else split
        rows.append({"split": shown, "tta": tta, "n_images": m["n_images"],
                     **{k: m[k] for k in SCALAR_METRICS},
                     **({k: m[k] for k in DEDUP_COLUMNS} if dup else {})})
    return pd.DataFrame(rows), full


def print_metrics(table: pd.DataFrame, full: dict[str, dict], classes: Sequence[str]) -> None:
    """Print the scalar table, then per TTA mode the per-class table, confusion counts and top confusions."""
    print(format_metrics(table))
    for tta, m in full.items():
        print(f"\n-- tta={tta}: per class")
        print(format_metrics(m["per_class"]))
        print(f"\n-- tta={tta}: confusion matrix (rows: true, columns: predicted)")
        print(pd.DataFrame(m["confusion"], index=list(classes), columns=list(classes)).to_string())
        print(f"\n-- tta={tta}: most confused pairs")
        print(format_metrics(confused_pairs(m["confusion"], classes).head(5)))


def print_calibration(model: nn.Module, meta: dict, data: FERData, split: str, probs: np.ndarray, *,
                       device: torch.device) -> pd.DataFrame:
    """ECE, NLL and Brier on `split` before and after temperature scaling (`probs`: without TTA).

    The temperature is the one saved with the weights (the final stage fits it on PublicTest);
    weights saved without one get it fitted here on PublicTest, unless PublicTest is the split
    evaluated (fitting on the scored split would flatter it), when it stays 1.
    """
    y = data.splits[split].y.numpy()
    if "temperature" in meta:
        t, source = float(meta["temperature"]), "saved with the weights"
    elif split != "PublicTest" and "PublicTest" in data.splits:
        val = data.splits["PublicTest"]
        t = fit_temperature(predict(model, val.x, device=device).numpy(), val.y.numpy())
        source = "fitted now on PublicTest (none saved with the weights)"
    else:
        t, source = 1.0, "none saved with the weights"
    return pd.DataFrame([{"source": source, **{k: compare(probs, y, t)[k] for k in CALIBRATION_COLUMNS}}])


def build_parser() -> Parser:
    """The `python -m search.evaluate` command line."""
    p = Parser(prog="python -m search.evaluate",
               description="Evaluate weights saved by the final stage on a FER2013 split and print its metrics.")
    p.add_argument("--model", required=True, help="weights file, e.g. results/<name>/final/models/<run>.pt")
    p.add_argument("--data", required=True, help="fer2013.csv, a Kaggle image folder, or 'demo'")
    p.add_argument("--split", default="PrivateTest", choices=list(SPLITS),
                   help="split to evaluate (default PrivateTest)")
    p.add_argument("--tta", nargs="+", default=["none", "flip"], choices=list(TTA_MODES),
                   help="test-time augmentations, each reported separately (default: none flip)")
    p.add_argument("--beta", type=float, default=1.0, help="beta of the F-beta score (default 1)")
    p.add_argument("--ferplus", default="", help="FER+ votes file: the labels of a model trained on FER+ labels, "
                                                 "else the label audit's second opinion (default fer2013new.csv "
                                                 "beside --data)")
    p.add_argument("--groups", default="", metavar="FILE",
                   help="CSV of group labels keyed by 'row' (0-based data row) or 'file' (image name), one column "
                        "per attribute: adds a per-group accuracy / macro recall report with bootstrap intervals")
    p.add_argument("--out", default="", metavar="DIR",
                   help="folder for the --groups report and the label audit (default results/<name>/final/groups/ "
                        "and final/labels/ for weights under final/models/, else beside the weights file)")
    p.add_argument("--bootstrap", type=int, default=None, metavar="N",
                   help=f"bootstrap replicates of the --groups intervals (default {N_BOOTSTRAP})")
    return p


def check_group_flags(a) -> GroupLabels | None:
    """The parsed groups file, or None without `--groups`; group-only flags without it are an error."""
    if not a.groups:
        if a.bootstrap is not None:
            raise UserError("--bootstrap only applies to the per-group report; add --groups FILE")
        return None
    if a.bootstrap is not None and a.bootstrap < 1:
        raise UserError(f"--bootstrap must be at least 1 replicate, got {a.bootstrap}")
    return read_groups(a.groups)


def print_groups(a, groups: pd.DataFrame, data: FERData, probs: np.ndarray, shown: str) -> None:
    """Print and write the per-group report of the first TTA mode's predictions on `a.split`."""
    target = data.splits[a.split]
    labelled = (groups != "").any(axis=1)
    print(f"\ngroups: {int(labelled.sum())} of {len(target)} {shown} images have group labels ({a.groups})")
    empty = [c for c in groups.columns if not (groups[c] != "").any()]
    if empty:
        print(f"groups: no {shown} image is labelled for {', '.join(empty)}; left out")
    table = group_report(target.y.numpy(), probs.argmax(1), groups.drop(columns=empty),
                         n_boot=a.bootstrap or N_BOOTSTRAP)
    small = table[(table["kind"] == "group") & ~table["in_gap"].astype(bool)]
    print(f"-- groups (tta={a.tta[0]}; 95% bootstrap intervals, {a.bootstrap or N_BOOTSTRAP} replicates; "
          f"gap: best minus worst group)")
    print(format_groups(table))
    if len(small):
        print(f"note: {len(small)} group(s) too small for the gap (in_gap False)")
    stem = f"{Path(a.model).stem}-{shown}"
    out = Path(a.out) if a.out else default_out_dir(a.model)
    csv, png = write_group_report(table, out, stem, title=f"{Path(a.model).name} on {shown}, tta={a.tta[0]}")
    print(f"group report: {csv}")
    print(f"group figure: {png}")


AUDIT_SHOWN = ("emotion", "n", "n_ferplus", "n_agreed", "accuracy", "accuracy_ferplus", "accuracy_agreed",
               "accuracy_either", "mistakes_ferplus", "ferplus_sides_model", "ferplus_sides_label",
               "ferplus_sides_neither")


def print_audit(a, data: FERData, probs: np.ndarray, tta: str, shown: str) -> None:
    """The label audit of `probs` on `a.split` against the FER+ votes: printed, and written under --out."""
    target = data.splits[a.split]
    out = Path(a.out) if a.out else default_out_dir(a.model, "labels")
    prefix = f"{Path(a.model).stem}-{shown}-"
    table, summary = write_label_audit(out, Path(a.model).stem, probs, target.y.numpy(), target.votes.numpy(),
                                       target.rows.numpy(), target.x.numpy(), data.classes, split=shown, tta=tta,
                                       prefix=prefix)
    left_out = table[table["emotion"] == ALL].iloc[0]
    print(f"\n-- labels against FER+ (tta={tta}; the FER+ majority of {left_out['n_ferplus']} images, leaving out "
          f"{left_out['n_contempt']} contempt, {left_out['n_unknown']} unknown, {left_out['n_not_face']} not a face "
          f"and {left_out['n_no_majority']} without a majority)")
    print(format_metrics(table[list(AUDIT_SHOWN)]))
    print("\n-- cleanlab's label issues against FER+ (precision: the share FER+ relabels)")
    print(format_metrics(summary))
    print(f"\n{headline(table, summary)}")
    print(f"label audit: {out / (prefix + 'label_audit.csv')} (and label_issues.csv, label_issues_summary.csv, "
          f"label_audit.png)")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, load the weights and the data, print the metrics; returns the exit status."""
    a = build_parser().parse_args(argv)
    if a.beta <= 0:
        raise UserError(f"--beta must be positive, got {a.beta}")
    labels = check_group_flags(a)   # a bad groups file fails before any model or data is loaded
    device = pick_device()
    model, meta = load_weights(a.model, device=device)
    label_set = str(meta.get("labels", "fer2013"))
    data = load_eval_data(a.data, a.split, labels=label_set, ferplus=a.ferplus or None,
                          seed=int(meta.get("data_seed", 0)))
    if len(data.classes) != int(meta["num_classes"]):
        raise UserError(f"{a.model} predicts {meta['num_classes']} classes but {a.data} has {len(data.classes)} "
                        f"({label_set} labels)")
    shown = data.test_name if a.split == "PrivateTest" else a.split
    groups = None
    if labels is not None:   # match the keys before predicting: a file that fits no image fails fast
        groups = labels_for_split(labels, data.splits[a.split].rows.numpy(), data=a.data, split=a.split,
                                  shown=shown)
    ttas = list(dict.fromkeys(a.tta))
    probs = predict_modes(model, data, a.split, ttas=ttas, device=device)
    table, full = evaluate_model(probs, data, a.split, beta=a.beta)
    print(f"{a.model} on {a.data} {shown} ({len(data.splits[a.split])} images, beta={a.beta:g})")
    print_metrics(table, full, data.classes)
    plain = probs["none"] if "none" in probs else predict(model, data.splits[a.split].x, device=device).numpy()
    cal = print_calibration(model, meta, data, a.split, plain, device=device)
    print(f"\n-- calibration (tta=none; temperature {cal['temperature'].iloc[0]:.3f}, {cal['source'].iloc[0]})")
    print(format_metrics(cal.drop(columns=["temperature", "source"])))
    if groups is not None:
        print_groups(a, groups, data, probs[ttas[0]], shown)
    if data.splits[a.split].votes is not None and tuple(data.classes) == EMOTIONS:
        print_audit(a, data, plain, "none", shown)
    return 0



if __name__ == "__main__":
    sys.exit(run_cli(main))

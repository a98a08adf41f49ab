"""`python -m search.evaluate --model <weights.pt> --data <fer2013 data>`: evaluate a saved model.

Loads weights written by the final stage (`results/<name>/final/models/*.pt`, read
with `weights_only=True`), rebuilds the model from the config stored beside its
state_dict, and prints the final stage's metrics on one split (PrivateTest by
default) of any data `load_fer2013` reads, for each test-time augmentation asked
for. Besides `search.final`, this is the only command that may read PrivateTest.
"""
from __future__ import annotations

import sys
from typing import Sequence

import pandas as pd
import torch
import torch.nn as nn

from search.cli import Parser, run_cli
from search.scoring import DEDUP_COLUMNS, duplicate_masks, score_split
from trainables.data import SPLITS, FERData, load_fer2013
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
                        seed=seed)


def format_metrics(rows: pd.DataFrame) -> str:
    """The scalar metrics as a fixed-width table (4 decimals)."""
    return rows.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def evaluate_model(model: nn.Module, data: FERData, split: str, *, ttas: Sequence[str], beta: float,
                   device: torch.device) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Score `model` on `split` once per TTA mode: a table (one row per mode) and the full metrics per mode."""
    target = data.splits[split]
    dup = duplicate_masks(data, split)
    rows, full = [], {}
    for tta in ttas:
        probs = predict(model, target.x, device=device, tta=tta).numpy()
        m = score_split(probs, target, beta=beta, class_names=data.classes, duplicates=dup)
        full[tta] = m
        shown = data.test_name if split == "PrivateTest" else split
        rows.append({"split": shown, "tta": tta, "n_images": m["n_images"],
                     **{k: m[k] for k in SCALAR_METRICS},
                     **({k: m[k] for k in DEDUP_COLUMNS} if dup else {})})
    return pd.DataFrame(rows), full


def print_report(table: pd.DataFrame, full: dict[str, dict], classes: Sequence[str]) -> None:
    """Print the scalar table, then per TTA mode the per-class table, confusion counts and top confusions."""
    print(format_metrics(table))
    for tta, m in full.items():
        print(f"\n-- tta={tta}: per class")
        print(format_metrics(m["per_class"]))
        print(f"\n-- tta={tta}: confusion matrix (rows: true, columns: predicted)")
        print(pd.DataFrame(m["confusion"], index=list(classes), columns=list(classes)).to_string())
        print(f"\n-- tta={tta}: most confused pairs")
        print(format_metrics(confused_pairs(m["confusion"], classes).head(5)))


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
    p.add_argument("--ferplus", default="", help="FER+ votes file for models trained on FER+ labels "
                                                 "(default fer2013new.csv beside --data)")
    return p


def run_evaluate(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, load the weights and the data, print the metrics; returns the exit status."""
    a = build_parser().parse_args(argv)
    if a.beta <= 0:
        raise UserError(f"--beta must be positive, got {a.beta}")
    device = pick_device()
    model, meta = load_weights(a.model, device=device)
    labels = str(meta.get("labels", "fer2013"))
    data = load_eval_data(a.data, a.split, labels=labels, ferplus=a.ferplus or None,
                          seed=int(meta.get("data_seed", 0)))
    if len(data.classes) != int(meta["num_classes"]):
        raise UserError(f"{a.model} predicts {meta['num_classes']} classes but {a.data} has {len(data.classes)} "
                        f"({labels} labels)")
    table, full = evaluate_model(model, data, a.split, ttas=list(dict.fromkeys(a.tta)), beta=a.beta, device=device)
    shown = data.test_name if a.split == "PrivateTest" else a.split
    print(f"{a.model} on {a.data} {shown} ({len(data.splits[a.split])} images, beta={a.beta:g})")
    print_report(table, full, data.classes)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: a user error is one line on stderr and exit status 2 (Ctrl-C: 130)."""
    return run_cli(run_evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())

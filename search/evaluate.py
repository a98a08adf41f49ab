"""`python -m search.evaluate --model <weights.pt> --data <fer2013 data>`: evaluate a saved model.

Loads weights written by the final stage (`results/<name>/final/models/*.pt`, read
with `weights_only=True`), rebuilds the model from the config stored beside its
state_dict, and prints the final stage's metrics on one split (PrivateTest by
default) of any data `load_fer2013` reads, for each test-time augmentation asked
for. Besides `search.final`, this is the only command that may read PrivateTest.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from search.cli import run_cli
from search.settings import _Parser
from trainables.data import SPLITS, FERData, Split, duplicate_mask, load_fer2013
from trainables.errors import UserError
from trainables.files import atomic_path, write_text
from trainables.metrics import SCALAR_METRICS, classification_metrics, confused_pairs, masked_accuracy
from trainables.train import TTA_MODES, model_from_config, pick_device, predict, resolve_config

WEIGHTS_KEYS = ("state_dict", "config", "classes", "num_classes")


# --------------------------------------------------------------------------- weights files

def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], *, config: dict,
                 classes: Sequence[str], info: dict | None = None) -> Path:
    """Write `<path>.pt` (state_dict, config, classes; loadable with weights_only=True) and `<path>.json`.

    `info` (seed, best epoch, PublicTest accuracy, history...) goes into both files;
    it must hold only JSON values. Returns the `.pt` path.
    """
    path = Path(path).with_suffix(".pt")
    meta = {"config": resolve_config(config), "classes": list(classes), "num_classes": len(classes),
            **(info or {})}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, **meta}, tmp)
    write_text(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True, default=float) + "\n")
    return path


def read_weights(path: str | os.PathLike) -> dict:
    """Read a weights file safely (weights_only=True); any unreadable or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; pass a .pt file from results/<name>/final/models/")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types here (pickle, zip, runtime): all mean "not our file"
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read {path} as weights saved by search.final ({reason})") from None
    missing = [k for k in WEIGHTS_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a weights file from search.final (missing {', '.join(missing)})")
    return ckpt


def model_from_weights(ckpt: dict, *, device: torch.device | None = None, source: str = "weights") -> nn.Module:
    """Rebuild the model of a weights dict and load its state_dict (ImageNet files are never needed)."""
    cfg = resolve_config(ckpt["config"])
    model = model_from_config(cfg, int(ckpt["num_classes"]), pretrained=False)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0][:160]
        raise UserError(f"{source}: the state_dict does not fit a {cfg['arch']} built from its config ({first})") \
            from None
    return model.to(device or torch.device("cpu")).eval()


def load_weights(path: str | os.PathLike, *, device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """Load a weights file: the model in eval mode on `device`, and the file's metadata (no state_dict)."""
    ckpt = read_weights(path)
    model = model_from_weights(ckpt, device=device, source=str(path))
    return model, {k: v for k, v in ckpt.items() if k != "state_dict"}


# --------------------------------------------------------------------------- evaluation

def score_split(probs: np.ndarray, split: Split, *, beta: float, class_names: Sequence[str],
                duplicates: np.ndarray | None = None) -> dict:
    """`classification_metrics` of `probs` on `split`, plus accuracy without the duplicates of Training."""
    y = split.y.numpy()
    m = classification_metrics(y, probs, beta=beta, class_names=class_names)
    if duplicates is not None:
        m["n_duplicates"] = int(duplicates.sum())
        m["accuracy_dedup"] = masked_accuracy(y, probs, ~duplicates)
    return m


def load_eval_data(path: str, split: str, *, labels: str, ferplus: str | None, seed: int = 0) -> FERData:
    """The split to evaluate, and Training too (to find the test images duplicated in it).

    `seed` must be the experiment's: an image folder without `val/` draws PublicTest from
    `train/` with it.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; choose from {list(SPLITS)}")
    return load_fer2013(path, splits=tuple({"Training", split}), labels=labels, ferplus_path=ferplus, seed=seed)


def format_metrics(rows: pd.DataFrame) -> str:
    """The scalar metrics as a fixed-width table (4 decimals)."""
    return rows.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def evaluate_model(model: nn.Module, data: FERData, split: str, *, ttas: Sequence[str], beta: float,
                   device: torch.device) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Score `model` on `split` once per TTA mode: a table (one row per mode) and the full metrics per mode."""
    target = data.splits[split]
    dup = duplicate_mask(target, data.train).numpy() if split != "Training" else None
    rows, full = [], {}
    for tta in ttas:
        probs = predict(model, target.x, device=device, tta=tta).numpy()
        m = score_split(probs, target, beta=beta, class_names=data.classes, duplicates=dup)
        full[tta] = m
        rows.append({"split": split, "tta": tta, "n_images": m["n_images"],
                     **{k: m[k] for k in SCALAR_METRICS},
                     **({"accuracy_dedup": m["accuracy_dedup"], "n_duplicates": m["n_duplicates"]} if dup is not None
                        else {})})
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


def build_parser() -> _Parser:
    """The `python -m search.evaluate` command line."""
    p = _Parser(prog="python -m search.evaluate",
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
    print(f"{a.model} on {a.data} {a.split} ({len(data.splits[a.split])} images, beta={a.beta:g})")
    print_report(table, full, data.classes)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: a user error is one line on stderr and exit status 2 (Ctrl-C: 130)."""
    return run_cli(run_evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m search.lr_find --arch convnet`: the LR range test, as a curve and a suggestion.

Trains a fresh model for a few hundred steps while the learning rate grows
exponentially, writes the smoothed loss against the LR as CSV and PNG under
`results/lr_find/`, and prints the suggested rate with the rule behind it.
Reads Training only.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from search.figures.plots import plot_lr_curve
from search.tuning.cli import Parser, run_cli
from trainables.augment import POLICIES, build_augment
from trainables.data import load_fer2013, stratified_fraction
from trainables.device import pick_device, to_device
from trainables.errors import UserError
from trainables.files import write_csv
from trainables.lr_range import lr_range_test
from trainables.models import MODELS, build_model
from trainables.optim import OPTIMIZERS


def build_parser() -> Parser:
    p = Parser(prog="python -m search.lr_find", description="LR range test (Smith 2017) for one model.")
    p.add_argument("--arch", required=True, help=f"model: one of {sorted(MODELS)}")
    p.add_argument("--data", default=os.environ.get("FER2013_PATH", "data/fer2013.csv"),
                   help="fer2013.csv, a Kaggle image folder, or 'demo' (default $FER2013_PATH, else data/fer2013.csv)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd", help="optimizer (default sgd)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default 5e-4)")
    p.add_argument("--augment", choices=sorted(POLICIES), default="flip_crop", help="augmentation (default flip_crop)")
    p.add_argument("--stem", default="stride", help="stem of ResNet/DenseNet: stride, keep or imagenet")
    p.add_argument("--steps", type=int, default=200, help="steps of the sweep (default 200)")
    p.add_argument("--start-lr", type=float, default=1e-6, help="first learning rate (default 1e-6)")
    p.add_argument("--end-lr", type=float, default=3.0, help="last learning rate (default 3)")
    p.add_argument("--train-fraction", type=float, default=1.0, help="share of Training to draw batches from")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--out", default="results/lr_find", help="output folder (default results/lr_find)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.batch_size < 2 or a.steps < 20:
        raise UserError("--batch-size must be at least 2 and --steps at least 20")
    if not 0 < a.start_lr < a.end_lr:
        raise UserError(f"need 0 < --start-lr < --end-lr, got {a.start_lr} and {a.end_lr}")
    if a.arch not in MODELS:
        raise UserError(f"unknown model '{a.arch}'; choose from {sorted(MODELS)}")
    data = load_fer2013(a.data, splits=("Training",), seed=a.seed)
    train = data.train if a.train_fraction >= 1 else stratified_fraction(data.train, a.train_fraction, seed=a.seed)
    torch.manual_seed(a.seed)
    device = pick_device()
    model = build_model(a.arch, num_classes=data.num_classes, stem=a.stem).to(device)
    result = lr_range_test(model, to_device(train, data.num_classes, device), optimizer=a.optimizer,
                           batch_size=a.batch_size, weight_decay=a.weight_decay,
                           augment=build_augment(a.augment, num_classes=data.num_classes), device=device,
                           generator=torch.Generator().manual_seed(a.seed), start_lr=a.start_lr,
                           end_lr=a.end_lr, steps=a.steps)
    out = Path(a.out)
    stem = f"{a.arch}-{a.optimizer}-bs{a.batch_size}"
    write_csv(pd.DataFrame({"lr": result["lrs"], "loss": result["losses"]}), out / f"{stem}.csv")
    plot_lr_curve(result, out / f"{stem}.png")
    print(f"suggested learning rate: {result['suggested_lr']:.3g}")
    print(f"rule: {result['rule']}")
    print(f"curve: {out / (stem + '.csv')}, {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

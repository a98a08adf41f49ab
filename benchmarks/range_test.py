"""The LR range test at a trial's sizes: does a short sweep find what a long one finds?

`python benchmarks/range_test.py --data PATH` runs, on real FER2013 (30% of Training, as the
README's hour), the range test a trial can afford before its first rung (RANGE_TEST_SHARE of
the images of --grace-epochs epochs: 53, 26 and 13 steps at batch 32, 64 and 128) for SGD and
AdamW ConvNets, with the rule of this version (each optimizer's own sweep, skip and smoothing
fixed in decades: `trainables.lr_range`) and with the rule before it (1e-6 to 3, the first 10
points skipped, torch-lr-finder's smoothing 0.05), and compares each suggestion with a
100-step sweep of the same rule. Writes `results/benchmarks/range_test.csv`; about 20 minutes
on one CPU core.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trainables.augment import build_augment  # noqa: E402
from trainables.data import load_fer2013, stratified_fraction  # noqa: E402
from trainables.device import to_device  # noqa: E402
from trainables.lr_range import SWEEP, lr_range_test, suggest_lr  # noqa: E402
from trainables.models import build_model  # noqa: E402
from trainables.runner import affordable_steps, plan_range_test  # noqa: E402

RECIPES = {"sgd": {"weight_decay": 5e-4, "width": 64}, "adamw": {"weight_decay": 1e-2, "width": 32}}


def suggestion(train, optimizer: str, batch: int, steps: int, rule: str, seed: int) -> float:
    torch.manual_seed(seed)
    model = build_model("convnet", num_classes=7, width=RECIPES[optimizer]["width"], depth=3)
    kw = dict(optimizer=optimizer, batch_size=batch, weight_decay=RECIPES[optimizer]["weight_decay"],
              augment=build_augment("flip_crop", num_classes=7), generator=torch.Generator().manual_seed(seed),
              steps=steps)
    if rule == "new":
        start, end = SWEEP[optimizer]
        return lr_range_test(model, train, start_lr=start, end_lr=end, **kw)["suggested_lr"]
    out = lr_range_test(model, train, start_lr=1e-6, end_lr=3.0, smooth_f=0.05, **kw)
    return suggest_lr(out["lrs"], out["losses"], skip=10)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/fer2013.csv")
    p.add_argument("--train-fraction", type=float, default=0.3)
    p.add_argument("--grace-epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", default="results/benchmarks")
    a = p.parse_args(argv)
    data = load_fer2013(a.data, splits=("Training",), seed=0)
    train = to_device(stratified_fraction(data.train, a.train_fraction, seed=0), 7, torch.device("cpu"))
    rows = []
    for optimizer in RECIPES:
        for batch in (32, 64, 128):
            steps = plan_range_test(len(train), batch, a.grace_epochs)["steps"]  # 0: the trial skips it
            plan_steps = affordable_steps(len(train), batch, a.grace_epochs)
            for rule in ("old", "new"):
                for seed in range(a.seeds):
                    short = suggestion(train, optimizer, batch, plan_steps, rule, seed) if plan_steps >= 3 else math.nan
                    long = suggestion(train, optimizer, batch, 100, rule, seed)
                    runs = steps > 0 if rule == "new" else plan_steps >= 20  # the old floor: 20 steps
                    rows.append({"optimizer": optimizer, "batch_size": batch, "rule": rule, "seed": seed,
                                 "steps": plan_steps, "runs_in_a_trial": runs,
                                 "suggested_short": short, "suggested_100": long,
                                 "factor_off": max(short, long) / min(short, long)})
                    print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    df.to_csv(Path(a.out) / "range_test.csv", index=False)
    summary = df.groupby(["optimizer", "batch_size", "rule"]).agg(
        steps=("steps", "first"), runs=("runs_in_a_trial", "first"), short=("suggested_short", "median"),
        long=("suggested_100", "median"), factor_off=("factor_off", "median")).reset_index()
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

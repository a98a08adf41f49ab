"""Command-line flags -> one frozen `Settings` object (the fixed experiment settings).

Searched hyperparameters live only in `spaces`; everything here is fixed for an
experiment and written to `results/<name>/settings.json`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from spaces import SPACES
from trainables.errors import UserError


@dataclass(frozen=True)
class Settings:
    """The resolved, fixed settings of one experiment."""

    space: str = "convnet"
    data: str = "data/fer2013.csv"
    name: str = ""
    results: str = "results"
    num_samples: int = 32
    max_epochs: int = 30
    grace_epochs: int = 2
    train_fraction: float = 1.0
    searcher: str = "optuna"
    scheduler: str = "asha"
    max_concurrent: int = 0           # 0: as many as the resources allow
    cpus_per_trial: int = 1
    gpus_per_trial: float = -1.0      # -1: 0.5 when the cluster has GPUs, else 0
    time_budget: float = 0.0          # 0: no limit
    seed: int = 0
    address: str = ""
    labels: str = "fer2013"
    ferplus: str = ""                 # FER+ votes file; default fer2013new.csv beside the data
    pretrained: str = "auto"
    resume: bool = False
    max_failures: int = 1
    final: bool = True
    final_top_k: int = 3
    final_epochs: int = 0             # 0: same as max_epochs
    final_seeds: int = 3
    beta: float = 1.0
    final_tta: tuple[str, ...] = ("none", "flip")

    @property
    def experiment_dir(self) -> Path:
        return Path(self.results) / self.name

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in json.loads(text).items() if k in fields}
        if "final_tta" in values:  # JSON has no tuples
            values["final_tta"] = tuple(values["final_tta"])
        return cls(**values)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def add_final_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the final retrain/evaluate stage, shared by `search.run` and `search.final`."""
    p.add_argument("--final-top-k", type=int, default=3, help="retrain the best K configurations (default 3)")
    p.add_argument("--final-epochs", type=int, default=0, help="epochs per final run (default: --max-epochs)")
    p.add_argument("--final-seeds", type=int, default=3, help="seeds per configuration (default 3)")
    p.add_argument("--beta", type=float, default=1.0, help="beta of the F-beta score (default 1)")
    p.add_argument("--final-tta", nargs="+", choices=["none", "flip", "tencrop"], default=["none", "flip"],
                   help="test-time augmentations, each reported separately; 'none' is always included "
                        "(default: none flip; tencrop costs 10 forward passes per image)")


def build_parser() -> argparse.ArgumentParser:
    """The `python -m search.run` command line."""
    p = _Parser(prog="python -m search.run",
                description="Search hyperparameters for FER2013 classifiers with Ray Tune (ASHA + Optuna), "
                            "then retrain and evaluate the best configurations.")
    p.add_argument("--space", required=True, help=f"search space: one of {sorted(SPACES)}")
    p.add_argument("--data", default=os.environ.get("FER2013_PATH", "data/fer2013.csv"),
                   help="fer2013.csv, a Kaggle image folder, or 'demo' (default $FER2013_PATH, else data/fer2013.csv)")
    p.add_argument("--name", default="", help="experiment name (default <space>-<timestamp>)")
    p.add_argument("--results", default="results", help="results folder (default results)")
    p.add_argument("--num-samples", type=int, default=32, help="number of trials (default 32)")
    p.add_argument("--max-epochs", type=int, default=30, help="epochs per trial, ASHA's max_t (default 30)")
    p.add_argument("--grace-epochs", type=int, default=2, help="ASHA grace period in epochs (default 2)")
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="stratified, seeded share of Training used by trials (default 1.0)")
    p.add_argument("--searcher", choices=["optuna", "random"], default="optuna",
                   help="optuna: TPE, seeded; random: Optuna's random sampler (default optuna)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha",
                   help="asha: stop weak trials early; fifo: run every trial to the end (default asha)")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: what resources allow)")
    p.add_argument("--cpus-per-trial", type=int, default=1, help="CPU cores per trial (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=-1.0,
                   help="GPUs per trial, fractions share a GPU (default 0.5 where the cluster has GPUs, else 0)")
    p.add_argument("--time-budget", type=float, default=0.0, help="stop the search after this many seconds")
    p.add_argument("--seed", type=int, default=0, help="seed of the searcher and the data slices (default 0)")
    p.add_argument("--address", default="", help="address of a running Ray cluster (default: a local instance)")
    p.add_argument("--labels", choices=["fer2013", "ferplus"], default="fer2013",
                   help="fer2013: the original labels; ferplus: FER+ majority votes, 8 classes")
    p.add_argument("--ferplus", default="", help="FER+ votes file (default fer2013new.csv beside --data)")
    p.add_argument("--pretrained", choices=["auto", "search", "off"], default="auto",
                   help="ImageNet weights as a search dimension: search, off, or auto (search where the files exist)")
    p.add_argument("--resume", action="store_true", help="continue the experiment --name after a crash or Ctrl-C")
    p.add_argument("--max-failures", type=int, default=1, help="retries of a failing trial from its checkpoint")
    p.add_argument("--no-final", action="store_true", help="skip the final retrain/evaluate stage")
    add_final_flags(p)
    return p


def check_settings(s: Settings) -> None:
    """Reject impossible combinations with a UserError that says how to fix them."""
    if s.space not in SPACES:
        raise UserError(f"unknown space '{s.space}'; choose from {sorted(SPACES)}")
    positives = {"--num-samples": s.num_samples, "--max-epochs": s.max_epochs, "--grace-epochs": s.grace_epochs,
                 "--cpus-per-trial": s.cpus_per_trial, "--final-top-k": s.final_top_k,
                 "--final-seeds": s.final_seeds}
    for flag, value in positives.items():
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    if s.grace_epochs > s.max_epochs:
        raise UserError(f"--grace-epochs ({s.grace_epochs}) must not exceed --max-epochs ({s.max_epochs})")
    if not 0.0 < s.train_fraction <= 1.0:
        raise UserError(f"--train-fraction must be in (0, 1], got {s.train_fraction}")
    for flag, value in {"--max-concurrent": s.max_concurrent, "--time-budget": s.time_budget,
                        "--max-failures": s.max_failures, "--final-epochs": s.final_epochs}.items():
        if value < 0:
            raise UserError(f"{flag} must not be negative, got {value}")
    if s.beta <= 0:
        raise UserError(f"--beta must be positive, got {s.beta}")
    if not s.name or "/" in s.name or s.name in (".", ".."):
        raise UserError(f"--name must be a plain folder name, got '{s.name}'")


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Parse and check the command line into `Settings`."""
    a = build_parser().parse_args(argv)
    name = a.name or f"{a.space}-{time.strftime('%Y%m%d-%H%M%S')}"
    s = Settings(space=a.space, data=a.data, name=name, results=a.results, num_samples=a.num_samples,
                 max_epochs=a.max_epochs, grace_epochs=a.grace_epochs, train_fraction=a.train_fraction,
                 searcher=a.searcher, scheduler=a.scheduler, max_concurrent=a.max_concurrent,
                 cpus_per_trial=a.cpus_per_trial, gpus_per_trial=a.gpus_per_trial, time_budget=a.time_budget,
                 seed=a.seed, address=a.address, labels=a.labels, ferplus=a.ferplus, pretrained=a.pretrained,
                 resume=a.resume, max_failures=a.max_failures, final=not a.no_final,
                 final_top_k=a.final_top_k, final_epochs=a.final_epochs, final_seeds=a.final_seeds, beta=a.beta,
                 final_tta=tuple(a.final_tta))
    check_settings(s)
    return s

"""Command-line flags -> one frozen `Settings` object (the fixed experiment settings).

Each flag is declared once, as a field of `Settings`: its default, its help text and its
choices live in the field, and `add_flags` turns fields into argparse options whose
destinations are the field names. Searched hyperparameters live only in `spaces`;
everything here is fixed for an experiment and written to `results/<name>/settings.json`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from search.tuning.cli import Parser
from spaces import SPACES
from trainables.data import LABEL_SETS
from trainables.errors import UserError
from trainables.inference import TTA_MODES

SEARCHERS = ("optuna", "random")
SCHEDULERS = ("asha", "fifo")
PRETRAINED_MODES = ("auto", "search", "off")
DATA_ENV = "FER2013_PATH"  # where --data comes from when it is not given


def _flag(default: Any, help: str, *, choices: Sequence[str] | None = None, what: str = "",
          default_text: str | None = None, **argparse_kwargs: Any):
    """A `Settings` field that is also a command-line flag.

    `choices` (from a registry) are checked with a one-line "unknown <what> 'x'; choose from
    [...]" error; `default_text` replaces the printed default where the value is a placeholder.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "what": what or "value",
            "default_text": default_text, "argparse": argparse_kwargs}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """The resolved, fixed settings of one experiment; each field is the flag `--<field-name>`."""

    space: str = _flag("convnet", "search space", choices=sorted(SPACES), what="space", required=True)
    data: str = _flag("data/fer2013.csv", "fer2013.csv, a Kaggle image folder, or 'demo'", metavar="PATH",
                      default_text=f"${DATA_ENV}, else data/fer2013.csv")
    name: str = _flag("", "experiment name", default_text="<space>-<timestamp>")
    results: str = _flag("results", "results folder", metavar="DIR")
    storage: str = _flag("", "where Ray Tune keeps trials and checkpoints: a URI every node can reach "
                             "(s3://bucket/prefix, gs://..., file:///shared/path, or a shared path); "
                             "settings.json, trials.csv and final/ stay in --results",
                         metavar="URI", default_text="--results")
    num_samples: int = _flag(32, "number of trials")
    max_epochs: int = _flag(30, "epochs per trial, ASHA's max_t")
    grace_epochs: int = _flag(2, "ASHA grace period in epochs (rungs at grace x 3^k)")
    train_fraction: float = _flag(1.0, "stratified, seeded share of Training used by trials")
    searcher: str = _flag("optuna", "optuna: TPE, seeded; random: Optuna's random sampler", choices=SEARCHERS,
                          what="searcher")
    scheduler: str = _flag("asha", "asha: stop weak trials early; fifo: run every trial to the end",
                           choices=SCHEDULERS, what="scheduler")
    max_concurrent: int = _flag(0, "trials at once", default_text="what the resources allow")
    cpus_per_trial: int = _flag(1, "CPU cores per trial (and per final run)")
    gpus_per_trial: float = _flag(-1.0, "GPUs per trial (and per final run); fractions share a GPU",
                                  default_text="0.5 where the cluster has GPUs, else 0")
    time_budget: float = _flag(0.0, "seconds for the whole command, start-up included (search.run: search and "
                                    "final stage together, the search stopping in time to leave the final stage "
                                    "its share; search.final: this stage alone); the final stage sizes its "
                                    "configurations, seeds and epochs to the time left, from the per-epoch times "
                                    "the search measured",
                               default_text="no limit")
    final_share: float = _flag(0.4, "with --time-budget: the most of the budget the final stage may take (it "
                                    "takes less when its runs need less)")
    warm_start: str = _flag("", "an earlier experiment whose finished trials seed this search's sampler "
                                "(trials that do not fit this space are left out, and said so)",
                            metavar="DIR", default_text="none")
    known_good: bool = _flag(True, "do not evaluate the space's known-good configurations first",
                             action="store_false", flag="--no-known-good")
    recipe_only: bool = _flag(False, "no search: train only the space's known-good configurations, one epoch each "
                                     "(which times them for the final stage's plan), and give the final stage the "
                                     "rest of the time (sets --num-samples to their number, --max-epochs and "
                                     "--grace-epochs 1, --scheduler fifo; --final-epochs defaults to the "
                                     "--max-epochs given); with under an hour on a CPU it beats the search "
                                     "(docs/performance.md)", action="store_true")
    max_latency_ms: float = _flag(0.0, "the most milliseconds one face may take (batch 1, one CPU thread, ONNX "
                                       "Runtime; every trial measures it, trials.csv's latency_ms): a trial "
                                       "over it is not trained, TPE learns the limit as a constraint, and so the "
                                       "final stage and its distilled student respect it",
                                  default_text="no limit")
    seed: int = _flag(0, "seed of the searcher, the data slices and the trials")
    address: str = _flag("", "address of a running Ray cluster", default_text="a local Ray instance")
    labels: str = _flag("fer2013", "fer2013: the original 7 labels; ferplus: FER+ votes, 8 classes",
                        choices=LABEL_SETS, what="label set")
    ferplus: str = _flag("", "FER+ votes file: --labels ferplus reads its labels; with FER2013 labels, its votes (the "
                         "ferplus_votes dimension, the label audit)", default_text="fer2013new.csv beside --data",
                         metavar="PATH")
    pretrained: str = _flag("auto", "ImageNet weights as a search dimension: search, off, or auto "
                                    "(search where every file of the space exists)",
                            choices=PRETRAINED_MODES, what="pretrained mode")
    resume: bool = _flag(False, "continue the experiment --name after a crash or Ctrl-C", action="store_true")
    max_failures: int = _flag(1, "retries of a failing trial from its last checkpoint")
    final: bool = _flag(True, "skip the final retrain/evaluate stage", action="store_false", flag="--no-final")
    report: bool = _flag(True, "skip report.html and its figures at the end (python -m search.report writes them "
                               "later)", action="store_false", flag="--no-report")
    ema_fraction: float = _flag(0.0, "keep an exponential moving average of each trial's and final run's weights "
                                     "over this share of the run, judge the run by it and keep it (0: off; "
                                     "search.final: retrain with it or, at 0, without)")
    verbose: bool = _flag(False, "show Ray's own status tables, per-trial boxes and the workers' output (checkpoint "
                                 "lines, tracebacks of trials stopped on purpose) on the console",
                          action="store_true")
    final_top_k: int = _flag(3, "retrain the best K configurations")
    final_epochs: int = _flag(0, "epochs per final run", default_text="--max-epochs")
    final_seeds: int = _flag(3, "seeds per configuration (--seed+1, --seed+2, ...: never the search's own)")
    distill: bool = _flag(True, "when the final stage builds an ensemble, distil it into one network of the best "
                                "run's configuration, exported as final/export/best_distilled.onnx; --no-distill "
                                "skips it (under --time-budget its epochs are planned with the runs')",
                          action=argparse.BooleanOptionalAction)
    beta: float = _flag(1.0, "beta of the F-beta score")
    final_tta: tuple[str, ...] = _flag(("none", "flip"), "test-time augmentations, each reported separately; "
                                       "'none' is always included (tencrop costs 10 forward passes per image)",
                                       choices=TTA_MODES, what="test-time augmentation", nargs="+")

    @property
    def experiment_dir(self) -> Path:
        return Path(self.results) / self.name

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        values = {k: v for k, v in json.loads(text).items() if k in FIELDS}
        if "final_tta" in values:  # JSON has no tuples
            values["final_tta"] = tuple(values["final_tta"])
        values.setdefault("ema_fraction", 0.0)  # an experiment from before the option trained without it
        return cls(**values)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Settings)}
# The flags of the final stage: `search.run` has them, and `search.final` can override them.
FINAL_FLAGS = ("final_top_k", "final_epochs", "final_seeds", "distill", "beta", "final_tta", "ema_fraction")


def _registry_type(kind: type, choices: Sequence[str] | None, what: str) -> Callable[[str], Any]:
    """argparse `type=`: convert, and refuse a name outside `choices` in the project's wording."""
    def convert(text: str) -> Any:
        if choices and text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {what} '{text}'; choose from {list(choices)}")
        return kind(text)
    convert.__name__ = kind.__name__  # argparse says "invalid int value" for a bad number
    return convert


def add_flags(parser: argparse.ArgumentParser, names: Sequence[str], *, from_experiment: bool = False) -> None:
    """Add the `Settings` fields `names` as flags (`--final-top-k` for `final_top_k`).

    With `from_experiment` a flag left out is absent from the parsed namespace (so the
    experiment's settings.json decides) and its help says so.
    """
    for name in names:
        f = FIELDS[name]
        meta = dict(f.metadata)
        kwargs = dict(meta["argparse"])
        flag = kwargs.pop("flag", f"--{name.replace('_', '-')}")
        if "action" not in kwargs:
            kind = str if isinstance(f.default, tuple) else type(f.default)
            kwargs["type"] = _registry_type(kind, meta["choices"], meta["what"])
            if meta["choices"]:
                kwargs["metavar"] = "{" + ",".join(meta["choices"]) + "}"
            else:
                kwargs.setdefault("metavar", {int: "N", float: "X"}.get(kind, "TEXT"))
        if kwargs.get("required"):
            shown = ""
        elif from_experiment:
            shown = " (default: the experiment's, from its settings.json)"
        else:
            value = meta["default_text"] or (" ".join(f.default) if isinstance(f.default, tuple) else f.default)
            shown = f" (default: {value})" if kwargs.get("action") != "store_false" else ""
        default = argparse.SUPPRESS if from_experiment else f.default
        if name == "data" and not from_experiment:
            default = os.environ.get(DATA_ENV, f.default)
        parser.add_argument(flag, dest=name, default=default, help=meta["help"] + shown, **kwargs)


def settings_parser() -> argparse.ArgumentParser:
    """The `python -m search.run` command line (its `build_parser`): one flag per `Settings` field."""
    p = Parser(prog="python -m search.run",
               description="Search hyperparameters for FER2013 classifiers with Ray Tune (ASHA + Optuna), "
                           "then retrain and evaluate the best configurations.")
    add_flags(p, list(FIELDS))
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
                        "--max-latency-ms": s.max_latency_ms,
                        "--max-failures": s.max_failures, "--final-epochs": s.final_epochs}.items():
        if value < 0:
            raise UserError(f"{flag} must not be negative, got {value}")
    if not 0.0 < s.final_share < 1.0:
        raise UserError(f"--final-share must be in (0, 1), got {s.final_share}")
    if not 0.0 <= s.ema_fraction < 1.0:
        raise UserError(f"--ema-fraction must be in [0, 1), got {s.ema_fraction}")
    if s.beta <= 0:
        raise UserError(f"--beta must be positive, got {s.beta}")
    if s.recipe_only and not s.known_good:
        raise UserError("--recipe-only trains the space's known-good configurations; drop --no-known-good")
    if s.recipe_only and s.warm_start:
        raise UserError("--recipe-only runs no search for --warm-start's trials to seed; drop one of the two")
    if not s.name or "/" in s.name or s.name in (".", ".."):
        raise UserError(f"--name must be a plain folder name, got '{s.name}'")


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Parse and check the command line into `Settings`."""
    values = vars(settings_parser().parse_args(argv))
    values["final_tta"] = tuple(values["final_tta"])
    values["name"] = values["name"] or f"{values['space']}-{time.strftime('%Y%m%d-%H%M%S')}"
    values["final_epochs"] = values["final_epochs"] or values["max_epochs"]
    s = Settings(**values)
    check_settings(s)
    return s


def read_settings(experiment: Path) -> Settings:
    """An experiment's settings.json, re-pointed at where the folder is now."""
    path = experiment / "settings.json"
    if not path.is_file():
        raise UserError(f"{experiment} is not an experiment folder (no settings.json); pass results/<name>")
    try:
        s = Settings.from_json(path.read_text())
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} is not a valid settings file ({err})") from None
    return dataclasses.replace(s, results=str(experiment.parent), name=experiment.name)

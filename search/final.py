"""`python -m search.final results/<name>`: the final stage alone, on a finished or interrupted experiment.

Flags left out keep the experiment's settings.json values; `--time-budget` bounds this stage alone.
The stage itself (`search.final_stage.stage.run_final`) is what `search.run` calls after its search.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from search.final_stage.stage import FINAL_DIR, run_final
from search.reporting.page import report_at_end
from search.tuning.budget import Clock, TimeSplit, command_started
from search.tuning.cli import Parser, run_cli
from search.tuning.cluster import check_local_gpus
from search.tuning.records import load_trials
from search.tuning.settings import FINAL_FLAGS, Settings, add_flags, check_settings, read_settings
from trainables.errors import UserError

# Experiment settings `search.final` may override besides the final-stage flags.
OVERRIDABLE = (*FINAL_FLAGS, "address", "data", "cpus_per_trial", "gpus_per_trial")


def build_parser() -> Parser:
    """The `python -m search.final` command line; a flag left out keeps the experiment's settings.json value
    (but --time-budget, which bounds this command alone: no limit unless given, and --verbose)."""
    p = Parser(prog="python -m search.final",
               description="Run the final stage alone on a finished or interrupted experiment: retrain the best "
                           "configurations and evaluate them on PrivateTest. Flags left out keep the values in "
                           "the experiment's settings.json.")
    p.add_argument("experiment", help="the experiment folder, e.g. results/<name>")
    add_flags(p, OVERRIDABLE, from_experiment=True)
    add_flags(p, ["time_budget", "verbose"])
    p.add_argument("--overwrite", action="store_true", help="replace an earlier final stage of this experiment")
    p.add_argument("--no-report", action="store_true",
                   help="skip report.html and its figures at the end (python -m search.report writes them later)")
    return p


def parse_final(argv: Sequence[str] | None = None) -> tuple[Settings, bool, bool]:
    """Flags + settings.json -> the Settings of this stage (its time_budget this command's own), and the
    --overwrite and --no-report flags."""
    a = build_parser().parse_args(argv)
    s = read_settings(Path(a.experiment))
    overrides = {key: getattr(a, key) for key in (*OVERRIDABLE, "time_budget", "verbose") if hasattr(a, key)}
    if "final_tta" in overrides:
        overrides["final_tta"] = tuple(overrides["final_tta"])
    s = dataclasses.replace(s, **overrides)
    # --final-epochs 0 means --max-epochs here as in search.run (it was planned as 0 epochs: "no epoch fits").
    s = dataclasses.replace(s, final_epochs=s.final_epochs or s.max_epochs)
    check_settings(s)
    check_local_gpus(s)
    return s, a.overwrite, a.no_report


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m search.final`: refuse to replace an earlier final stage unless asked, run the stage, write
    the report; returns 0, raises UserError on bad input. --time-budget counts from `command_started(argv)`."""
    started = command_started(argv)
    s, overwrite, no_report = parse_final(argv)
    if (s.experiment_dir / FINAL_DIR / "metrics.csv").exists() and not overwrite:
        raise UserError(f"{s.experiment_dir / FINAL_DIR} already holds a final stage; add --overwrite to replace it")
    clock = Clock(s.time_budget, started) if s.time_budget else None
    split = TimeSplit(budget=s.time_budget, startup=clock.elapsed()) if clock else None
    run_final(s, load_trials(s.experiment_dir, s.max_epochs, s.storage), clock=clock, split=split)
    if not no_report:
        report_at_end(s.experiment_dir)
    if split:
        split.final = clock.elapsed() - split.startup
        print(split.line())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

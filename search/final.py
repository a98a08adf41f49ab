"""`python -m search.final results/<name>`: retrain the best configurations, evaluate them once on PrivateTest.

Reads top to bottom: pick the top-k configurations of the search by PublicTest
accuracy; load the data with all three splits (this stage and `search.evaluate`
are the only readers of PrivateTest); retrain each configuration from scratch on
the full Training split with several seeds, in parallel as Ray tasks that see only
Training and PublicTest and keep their best PublicTest epoch; save the weights;
then score every run, the per-configuration mean and spread and two ensembles on
PrivateTest, once per test-time augmentation, and write tables and pictures under
`results/<name>/final/`. `search.run` calls `run_final` after the search.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Sequence

from search.analysis import print_table, write_error_analysis, write_exports, write_readme, write_visualisations
from search.budget import Clock, Measured, TimeSplit, full_epoch_seconds, plan_final, process_started
from search.candidates import Candidate, select_candidates
from search.cli import Parser, run_cli
from search.cluster import trial_resources
from search.export import TrialRecord, load_trials
from search.report import report_at_end
from search.retrain import load_final_data, retrain_all
from search.scoring import ANALYSIS_TTA, choose_analysed, metrics_table, per_class_table, predict_runs, score_models
from search.settings import FINAL_FLAGS, Settings, add_flags, check_settings, read_settings
from trainables.device import pick_device
from trainables.errors import UserError
from trainables.files import write_csv

FINAL_DIR = "final"
# Experiment settings `search.final` may override besides the final-stage flags.
OVERRIDABLE = (*FINAL_FLAGS, "address", "data", "cpus_per_trial", "gpus_per_trial")


def clear_outputs(out: Path) -> None:
    """Remove the weights, exports and TensorBoard runs of an earlier final stage, so no stale run is left behind."""
    for sub in ("models", "tensorboard", "export"):
        shutil.rmtree(out / sub, ignore_errors=True)


def fit_to_budget(s: Settings, trials: Sequence[TrialRecord], candidates: Sequence[Candidate], clock: Clock, data,
                  ttas: Sequence[str], split: TimeSplit | None) -> tuple[Settings, float]:
    """The final stage's top-k, seeds and epochs cut to the time left, and the deadline of its runs.

    Sized from the per-epoch times the search measured for `candidates`, best first (see `search.budget`);
    a UserError when not one epoch of the best configuration fits.
    """
    import ray

    # Ray is running under search.run; search.final alone starts it only to retrain, so it counts
    # this machine's CPUs (a cluster's are known only once joined: one slot, the safe guess).
    cluster = (ray.cluster_resources() if ray.is_initialized()
               else {"CPU": 1 if s.address else (os.cpu_count() or 1)})
    _, slots = trial_resources(dataclasses.replace(s, num_samples=s.final_top_k * s.final_seeds), cluster)
    by_id = {t.trial_id: t for t in trials}
    n_search = round(len(data.train) * s.train_fraction)
    times = [full_epoch_seconds(Measured.of(by_id[c.trial_id]), n_search, len(data.train)) for c in candidates]
    left = clock.left()
    plan = plan_final(times, slots=slots, top_k=s.final_top_k, seeds=s.final_seeds, epochs=s.final_epochs,
                      seconds=left, n_full=len(data.train), n_test=len(data.test), ttas=len(ttas))
    if plan is None:
        raise UserError(f"the time budget leaves {left:.0f} s for the final stage, not enough for one epoch of the "
                        f"best configuration (about {times[0]:.0f} s on the full Training split); the search's "
                        f"results are kept: run python -m search.final {s.experiment_dir} to finish without a budget")
    print(f"final stage within the time budget: {left:.0f} s left, so {plan.top_k} configurations x {plan.seeds} "
          f"seeds x {plan.epochs} epochs ({slots} at once; estimated {plan.seconds:.0f} s; "
          f"wanted {s.final_top_k} x {s.final_seeds} x {s.final_epochs})", flush=True)
    if split:
        split.final_reserved, split.plan = left, {"top_k": plan.top_k, "seeds": plan.seeds, "epochs": plan.epochs,
                                                  "estimated_seconds": round(plan.seconds, 1)}
    s = dataclasses.replace(s, final_top_k=plan.top_k, final_seeds=plan.seeds, final_epochs=plan.epochs)
    return s, clock.deadline - plan.eval_seconds


def run_final(settings: Settings, trials: Sequence[TrialRecord], *, clock: Clock | None = None,
              split: TimeSplit | None = None) -> Path:
    """Retrain the top configurations of `trials` and evaluate them on PrivateTest; returns the output folder.

    Each TTA mode in `settings.final_tta` gets its own rows. With `clock` (--time-budget) the
    stage is cut to the time left and every run stops after the last epoch that fits.
    """
    s = settings
    out = s.experiment_dir / FINAL_DIR
    candidates = select_candidates(trials, s.final_top_k)
    if not candidates:
        raise UserError(f"no trial of {s.experiment_dir} has a PublicTest accuracy (errored and diverged trials "
                        f"do not count); finish at least one epoch of the search (--resume) first")
    start = time.perf_counter()
    data = load_final_data(s)  # before any training: a bad PrivateTest fails now, not after hours
    ttas = [ANALYSIS_TTA, *dict.fromkeys(t for t in s.final_tta if t != ANALYSIS_TTA)]  # the analysis needs "none"
    deadline = None
    if clock:
        s, deadline = fit_to_budget(s, trials, candidates, clock, data, ttas, split)
        candidates = candidates[:s.final_top_k]
    epochs = s.final_epochs or s.max_epochs
    clear_outputs(out)
    runs = retrain_all(s, data, candidates, epochs=epochs, out=out, ttas=ttas, deadline=deadline)
    trained = time.perf_counter()
    if not runs:
        raise UserError("every final run diverged in its first epoch; nothing to evaluate")
    probs = predict_runs(runs, data, ttas=ttas, device=pick_device())
    rows, full = score_models(runs, probs, data, ttas=ttas, beta=s.beta)
    table = metrics_table(rows, ttas)
    write_csv(table, out / "metrics.csv")
    write_csv(per_class_table(full), out / "per_class.csv")
    analysed = choose_analysed(full, runs)
    write_error_analysis(out, analysed, full, data, ttas)
    write_visualisations(out, runs, data)
    write_exports(out, runs, full)
    write_readme(out, s, analysed, epochs, ttas, test_name=data.test_name)
    print(f"\n{data.test_name} ({len(data.test)} images; {rows[0]['n_dup_training']} duplicated in Training, "
          f"{rows[0]['n_dup_publictest']} in PublicTest), "
          f"{len(runs)} runs, {time.perf_counter() - start:.0f} s (training {trained - start:.0f} s, "
          f"scoring and figures {time.perf_counter() - trained:.0f} s):")
    print_table(table)
    print(f"\nfinal results: {out} (error analysis of {analysed})")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The `python -m search.final` command line; a flag left out keeps the experiment's settings.json value."""
    p = Parser(prog="python -m search.final",
               description="Run the final stage alone on a finished or interrupted experiment: retrain the best "
                           "configurations and evaluate them on PrivateTest. Flags left out keep the values in "
                           "the experiment's settings.json.")
    p.add_argument("experiment", help="the experiment folder, e.g. results/<name>")
    add_flags(p, OVERRIDABLE, from_experiment=True)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier final stage of this experiment")
    p.add_argument("--no-report", action="store_true",
                   help="skip report.html and its figures at the end (python -m search.report writes them later)")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                   help="seconds for this stage, start-up included: configurations, seeds and epochs are cut to "
                        "fit, from the per-epoch times the search measured (default: no limit)")
    return p


def parse_final(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    """Flags + settings.json -> the Settings of this stage, and the parsed flags (for --overwrite)."""
    a = build_parser().parse_args(argv)
    s = read_settings(Path(a.experiment))
    overrides = {key: getattr(a, key) for key in OVERRIDABLE if hasattr(a, key)}
    if "final_tta" in overrides:
        overrides["final_tta"] = tuple(overrides["final_tta"])
    s = dataclasses.replace(s, **overrides)
    check_settings(s)
    return s, a


def final_command(argv: Sequence[str] | None = None, started: float | None = None) -> int:
    """Parse the flags, refuse to replace an earlier final stage unless asked, run the stage; returns 0.

    `started` (a `time.time()` value, default now) is when --time-budget starts counting."""
    started = started or time.time()
    s, flags = parse_final(argv)
    if flags.time_budget < 0:
        raise UserError(f"--time-budget must not be negative, got {flags.time_budget}")
    if (s.experiment_dir / FINAL_DIR / "metrics.csv").exists() and not flags.overwrite:
        raise UserError(f"{s.experiment_dir / FINAL_DIR} already holds a final stage; add --overwrite to replace it")
    clock = Clock(flags.time_budget, started) if flags.time_budget else None
    split = TimeSplit(budget=flags.time_budget, startup=clock.elapsed()) if clock else None
    run_final(s, load_trials(s.experiment_dir, s.max_epochs, s.storage), clock=clock, split=split)
    if not flags.no_report:
        report_at_end(s.experiment_dir)
    if split:
        split.final = clock.elapsed() - split.startup
        print(split.line())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: a user error is one line on stderr and exit status 2 (Ctrl-C: 130)."""
    return run_cli(final_command, argv)


if __name__ == "__main__":
    sys.exit(run_cli(partial(final_command, started=process_started())))

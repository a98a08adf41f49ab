"""`python -m search.run --space resnet`: search, export, then retrain and evaluate the best.

Reads top to bottom: parse the flags into `Settings`, check the data and the
experiment folder before anything is written, start (or join) Ray, run the Tuner
(OptunaSearch + ASHA over a space from `spaces`), export `trials.csv`, and hand
the best configurations to the final stage. PrivateTest is never loaded here.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Sequence

from search.tuning.budget import Clock, SearchBudget, TimeSplit, active, command_started, search_budget, set_active
from search.tuning.cli import Parser, run_cli
from search.tuning.cluster import (
    check_local_gpus,
    memory_limits,
    start_ray,
    tolerate_lost_workers,
    trial_request,
    trial_resources,
)
from search.tuning.console import Console
from search.tuning.records import UNFINISHED, TrialRecord, schedule_in_epochs, trials_table, write_trials_csv
from search.tuning.settings import Settings, parse_settings, settings_parser
from search.tuning.storage import TUNE_DIR, experiment_root, resolve, tune_location, tune_started
from search.tuning.study import STUDY_NAME, resume_into, settle_finished
from search.tuning.warm_start import KNOWN_GOOD, StudySeed, prepared_storage, study_seed
from spaces import archs_of, get_space, with_constants
from trainables.data import SEARCH_SPLITS, FERData, load_fer2013, stratified_fraction
from trainables.errors import UserError, last_line
from trainables.files import write_text
from trainables.metrics import METRIC, MODE

# Each epoch checkpoints; Ray warns about frequent experiment snapshots, which is expected here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def load_search_data(s: Settings) -> FERData:
    """Training (the --train-fraction slice) and PublicTest only: the search never sees PrivateTest."""
    data = load_fer2013(s.data, splits=SEARCH_SPLITS, labels=s.labels, ferplus_path=s.ferplus or None,
                        seed=s.seed, votes=True)
    if s.train_fraction < 1.0:
        train = stratified_fraction(data.train, s.train_fraction, seed=s.seed)
        data = FERData(classes=data.classes, splits={**data.splits, "Training": train}, source=data.source)
    return data


def recipe_only(s: Settings) -> Settings:
    """What --recipe-only runs: the known-good configurations as the only trials, one epoch each, none stopped.

    One epoch, not none: the final stage plans its epochs from the seconds per epoch the trials measured.
    `final_epochs` was resolved from the --max-epochs given (`parse_settings`), before this sets it to 1; the
    flags it cannot go with were refused there (`check_settings`)."""
    count = len(KNOWN_GOOD.get(s.space, []))
    if not count:
        raise UserError(f"the space '{s.space}' has no known-good configurations for --recipe-only; "
                        f"choose from {sorted(k for k, v in KNOWN_GOOD.items() if v)}")
    return dataclasses.replace(s, num_samples=count, max_epochs=1, grace_epochs=1, scheduler="fifo")


def check_experiment_dir(s: Settings) -> Path:
    """Refuse to overwrite an experiment, and to resume one that does not exist."""
    exp = s.experiment_dir
    started = tune_started(exp, s.storage)
    if s.resume and not started:
        where = f" (looked in {tune_location(exp, s.storage)})" if s.storage else ""
        raise UserError(f"nothing to resume: {exp} has no search{where}; run without --resume to start it")
    if not s.resume and s.storage and started:
        raise UserError(f"{tune_location(exp, s.storage)} already holds a search; add --resume to continue it, "
                        f"or choose another --name")
    if not s.resume and exp.exists() and any(exp.iterdir()):
        raise UserError(f"experiment {exp} already exists; add --resume to continue it, "
                        f"or choose another --name")
    return exp


# Settings that define what a search is; a resumed search must keep them.
SEARCH_FIELDS = ("space", "data", "storage", "train_fraction", "labels", "ferplus", "seed", "num_samples", "max_epochs",
                 "grace_epochs", "searcher", "scheduler", "pretrained", "warm_start", "known_good", "recipe_only",
                 "ema_fraction")


def check_resume_settings(s: Settings) -> None:
    """--resume continues the same search: refuse flags that would change it (other data, space, seed...)."""
    path = s.experiment_dir / "settings.json"
    if not path.exists():
        return
    before = Settings.from_json(path.read_text())
    if schedule_in_epochs(s.experiment_dir, s.storage):
        raise UserError(f"{s.experiment_dir} is from an older version (schedule settings in epochs) and cannot "
                        f"be resumed; start a new search, e.g. with --warm-start {s.experiment_dir}, which "
                        f"replays its trials")
    changed = [f"--{f.replace('_', '-')} {getattr(before, f)} (now {getattr(s, f)})"
               for f in SEARCH_FIELDS if getattr(before, f) != getattr(s, f)]
    if changed:
        raise UserError(f"--resume must repeat the experiment's search flags; it was started with "
                        f"{', '.join(changed)}")


def offers_weights(s: Settings) -> bool:
    """Whether ImageNet weights are a search dimension: `search` needs every file, `auto` uses them if present.

    All or nothing across the space's architectures: one missing file leaves the dimension out.
    """
    archs = [a for a in archs_of(s.space) if a != "convnet"]
    if s.pretrained == "off" or not archs:
        return False
    from trainables.models import pretrained_weights_path

    missing = [pretrained_weights_path(a) for a in archs if not pretrained_weights_path(a).exists()]
    if s.pretrained == "search" and missing:
        raise UserError(f"--pretrained search needs ImageNet weights, but {missing[0]} is missing "
                        f"({len(missing)} of {len(archs)} files); fetch them on a connected machine with "
                        f"python -c \"import torchvision; torchvision.models.{archs[0]}(weights='IMAGENET1K_V1')\" "
                        f"(one call per model) and copy $TORCH_HOME/hub/checkpoints here, or use --pretrained off")
    return not missing


def asha_rungs(s: Settings) -> list[int]:
    """The epochs where ASHA compares trials (grace x 3^k below --max-epochs), and the last epoch.

    The first is what a trial trains before it is first judged, which bounds its LR range test.
    """
    rungs, epoch = [], s.grace_epochs
    while s.scheduler == "asha" and epoch < s.max_epochs:
        rungs.append(epoch)
        epoch *= 3
    return [*rungs, s.max_epochs]


def seed_study(s: Settings, offer_weights: bool, votes: bool = False) -> StudySeed:
    """What the study starts from: --warm-start's trials, the known-good configs (its `notes` say which)."""
    seed = study_seed(s.space, ferplus=s.labels == "ferplus", offer_weights=offer_weights, votes=votes,
                      warm_start=s.warm_start, use_known_good=s.known_good, current=s)
    return seed


def startup_trials(num_samples: int) -> int:
    """Random trials before TPE models the results: a fifth of the search, between 3 and Optuna's default 10.

    With Optuna's fixed 10, a search of 10-15 trials would be (almost) a random search.
    """
    return max(3, min(10, num_samples // 5))


def tpe_sampler(seed: int, n_startup_trials: int, max_latency_ms: float = 0.0):
    """TPE that models the parameters jointly (`multivariate`) and per branch of the space (`group`):
    an SGD trial's rate is modelled from SGD trials only, and its schedule's settings with the schedule
    that has them, rather than each parameter alone over every trial that happened to draw it.
    With `max_latency_ms` the limit is a constraint (`constraints_func`): TPE draws from where feasible
    trials were, so it stops proposing models too slow to train. The objective stays accuracy alone
    (ASHA compares one metric; see the README)."""
    import optuna

    from search.tuning.callbacks import latency_constraint

    constraints = latency_constraint(max_latency_ms) if max_latency_ms else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # these options are "experimental"
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, multivariate=True, group=True,
                                          constraints_func=constraints)


def build_tuner(s: Settings, data: FERData, exp: Path, resources: dict, concurrent: int, writer, *,
                offer_weights: bool = False, votes: bool = False, study: StudySeed | None = None,
                stoppers: Sequence = (),
                callbacks: Sequence = (), reuse_actors: bool = True, pruner=None):
    """The Tuner: OptunaSearch (TPE or random, seeded) + ASHA or FIFO, or the restored one with --resume.

    `study` is what the study starts from (`seed_study`, made here when not given); the study itself
    is written to `optuna.db` in the experiment folder (`search.tuning.study`); `stoppers` are
    Tune stoppers besides the time budget's (the benchmarks stop at a number of trial epochs), and
    `callbacks` Tune callbacks besides `writer` (the benchmarks' timelines), `pruner` the
    `CheckpointPruner` (made here when not given; the caller keeps it to prune once more at the end).
    `reuse_actors`: a finished trial's worker process runs the next trial with the same resource
    request (Tune keys its cached workers by the request, so a trial that needs more memory gets a
    worker of its own), instead of a new process importing PyTorch again (benchmarks/overhead.py
    measures both). The trainable keeps nothing in the process between trials
    (`trainables.tune_trainable.train_fer`); tests/e2e/test_reliability.py runs failing, retried,
    diverging and normal trials through reused workers.
    """
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.stopper import CombinedStopper

    from search.tuning.callbacks import BudgetStopper, CheckpointPruner, TrackedOptunaSearch, TrialLogsKept
    from trainables.tune_trainable import train_fer

    limits = memory_limits(bool(resources["gpu"]))
    # Each trial asks Ray for the memory its configuration needs (see trainables.memory).
    request = partial(trial_request, cpus=resources["cpu"], gpus=resources["gpu"], limits=limits,
                      num_classes=data.num_classes)
    rungs = asha_rungs(s)
    storage = experiment_root(exp, s.storage)  # --storage URI, or results/<name>
    fs, tune_path = resolve(tune_location(exp, s.storage))
    trainable = tune.with_resources(
        tune.with_parameters(train_fer, data=data, max_epochs=s.max_epochs, seed=s.seed,
                             checkpoint_epochs=rungs, range_test_epochs=rungs[0],
                             threads=s.cpus_per_trial, memory_limit=limits,
                             trial_root=tune_path if fs.type_name == "local" else None,
                             max_latency_ms=s.max_latency_ms), request)
    if s.resume:
        resume_into(exp)  # the study's mirror follows the experiment folder, wherever it is now
        # Finished trials (errored ones included) stay as they are; unfinished ones continue.
        return tune.Tuner.restore(tune_location(exp, s.storage), trainable, resume_unfinished=True,
                                  resume_errored=False)
    space = partial(get_space(s.space), ferplus=s.labels == "ferplus", offer_weights=offer_weights, votes=votes)
    if s.ema_fraction:  # every trial judged by (and the final stage keeping) its averaged weights
        space = partial(with_constants, space=space, constants={"ema_fraction": s.ema_fraction})
    sampler = (tpe_sampler(s.seed, startup_trials(s.num_samples), s.max_latency_ms) if s.searcher == "optuna"
               else optuna.samplers.RandomSampler(seed=s.seed))
    study_db = prepared_storage(exp, study or seed_study(s, offer_weights, votes))
    searcher = ConcurrencyLimiter(TrackedOptunaSearch(space=space, metric=METRIC, mode=MODE, sampler=sampler,
                                                      storage=study_db, study_name=STUDY_NAME),
                                  max_concurrent=concurrent)
    scheduler = (ASHAScheduler(time_attr="training_iteration", metric=METRIC, mode=MODE, max_t=s.max_epochs,
                               grace_period=s.grace_epochs, reduction_factor=3)
                 if s.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=s.num_samples, reuse_actors=reuse_actors,
                                    trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(
            # Ray's own status tables and per-trial boxes with --verbose only (search.tuning.console draws
            # the default console); workers' output stays in Ray's session logs (not Tune's log_to_file).
            name=TUNE_DIR, storage_path=storage, verbose=1 if s.verbose else 0,
            stop=CombinedStopper(BudgetStopper(), *stoppers),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            # Every checkpoint kept by Tune; CheckpointPruner deletes what the saved experiment state no
            # longer names (Tune's num_to_keep deletes before the state naming the successor is saved).
            # TrialLogsKept: a retried trial keeps the result.json rows it reported before it failed.
            checkpoint_config=tune.CheckpointConfig(),
            callbacks=[writer, TrialLogsKept(), pruner or CheckpointPruner(tune_path), *callbacks]),
    )


def what_runs(s: Settings) -> str:
    """The trials a search runs, as its first line says them."""
    if s.recipe_only:
        return (f"no search (--recipe-only): its {s.num_samples} known-good configurations, one epoch each to time "
                f"them for the final stage")
    rungs = asha_rungs(s)[:-1]
    judged = f"ASHA at epochs {', '.join(map(str, rungs))}" if rungs else "no early stopping"
    return f"{s.num_samples} trials of up to {s.max_epochs} epochs ({judged}), searcher {s.searcher}"


def header(s: Settings, data: FERData, resources: dict, concurrent: int, budget: SearchBudget | None,
           study: StudySeed | None) -> list[str]:
    """The lines a search starts with: the experiment, its data, its budget, its resources, what the study holds."""
    lines = [f"experiment {s.experiment_dir}: space {s.space}, {what_runs(s)}, seed {s.seed}"
             + (" (resumed)" if s.resume else ""),
             f"data: {data.source}, {len(data.train)} Training images"
             + (f" ({100 * s.train_fraction:.0f}%)" if s.train_fraction < 1 else "")
             + f", {len(data.val)} PublicTest images (PrivateTest is read by the final stage only)"]
    if data.train.votes is not None:
        lines.append("FER+ votes found: the search also tries them as a share of the training target (ferplus_votes), "
                     "and the final stage audits the labels against them")
    if budget:
        lines.append(f"time budget: {s.time_budget:.0f} s from the command's start ({budget.clock.elapsed():.0f} s "
                     f"gone); the search stops in time to leave the final stage at most "
                     f"{100 * budget.share:.0f}% of it" if budget.final else
                     f"time budget: {s.time_budget:.0f} s from the command's start, all of it the search's")
    limits = memory_limits(bool(resources["gpu"]))
    lines.append(f"resources: {concurrent} trial(s) at once, {resources['cpu']} CPU and {resources['gpu']} GPU each; "
                 f"at most {limits['cpu'] / 2**30:.1f} GiB of memory per trial"
                 + (f", {limits['cuda'] / 2**30:.1f} GiB per GPU" if "cuda" in limits else ""))
    lines.extend(study.notes if study else [])
    lines.append(f"watch it: tensorboard --logdir {experiment_root(s.experiment_dir, s.storage)}"
                 + ("" if s.verbose else "; Ray's own tables and worker logs: --verbose"))
    return lines


def print_summary(df, exp: Path, storage: str = "") -> None:
    """The five best trials, and where everything was written."""
    cols = [c for c in ["trial_id", "status", "objective", "epochs", "config/arch", "config/optimizer",
                        "config/lr", "config/augment"] if c in df.columns]
    print(df[cols].head(5).to_string(index=False))
    print(f"\ntrials: {exp / 'trials.csv'}\ntensorboard: tensorboard --logdir {experiment_root(exp, storage)}")


def run_search(s: Settings, started: float | None = None) -> int:
    """Run the whole experiment described by `s`; returns the exit status.

    `started` (a `time.time()` value, default now) is when --time-budget starts counting.
    """
    clock = Clock(s.time_budget, started or time.time()) if s.time_budget else None
    s = recipe_only(s) if s.recipe_only else s
    get_space(s.space)
    check_local_gpus(s)
    exp = check_experiment_dir(s)
    if s.resume:
        check_resume_settings(s)
    data = load_search_data(s)
    offer_weights = False if s.resume else offers_weights(s)  # a resumed search keeps its space
    votes = data.train.votes is not None  # FER+ votes beside FER2013 labels: a target the search may try
    study = None if s.resume else seed_study(s, offer_weights, votes)  # a bad --warm-start fails before Ray starts
    cluster = start_ray(s)
    tolerate_lost_workers()
    resources, concurrent = trial_resources(s, cluster)
    # settings.json records what the experiment ran with, not the flags' placeholders.
    s = dataclasses.replace(s, gpus_per_trial=resources["gpu"], max_concurrent=concurrent)
    from search.tuning.callbacks import CheckpointPruner, SearchConsole, TrialsCsvWriter

    console = Console(live=False if s.verbose else None)  # Ray's own prints would break a redrawn line
    watch = SearchConsole(console, max_epochs=s.max_epochs, rungs=asha_rungs(s)[:-1], num_samples=s.num_samples,
                          budget=active)
    pruner = CheckpointPruner(tune_location(exp, s.storage))
    tuner = build_tuner(s, data, exp, resources, concurrent, TrialsCsvWriter(exp, s.max_epochs),
                        offer_weights=offer_weights, votes=votes, study=study, callbacks=[watch], pruner=pruner)
    write_text(exp / "settings.json", s.to_json())
    budget = search_budget(s, clock, data, concurrent) if clock else None
    split = TimeSplit(budget=s.time_budget, startup=clock.elapsed()) if clock else None
    for line in header(s, data, resources, concurrent, budget, study):
        console.event(line)
    set_active(budget)
    failed: dict[str, str] = {}
    try:
        failed = failed_trials(tuner.fit())
    except KeyboardInterrupt:  # a second Ctrl-C: Ray stops at once
        pass
    finally:
        set_active(None)
        console.close()
    pruner.prune(final=True)  # the state Tune saved at its end names each trial's last checkpoint
    trials = write_trials_csv(exp, s.max_epochs, failed=failed, storage=s.storage)
    settle_finished(exp, trials)  # trials a stopper ended, as trials.csv has them
    print_summary(trials_table(trials), exp, s.storage)
    if _interrupted(trials, s, budget):
        print(f"\nThe search was interrupted; finished trials are in {exp / 'trials.csv'}. To continue it, "
              f"run the same command with --name {s.name} --results {s.results} --resume", file=sys.stderr)
        return 130
    if split:
        split.search = clock.elapsed() - split.startup
        if budget.stopped_at:
            print(f"search stopped by the time budget with {clock.left():.0f} s left for the final stage")
    # Imported here, not at the top: scikit-learn, SciPy and matplotlib cost a search that ends
    # without them (--no-final --no-report) about 2 s of start-up before its first trial.
    if s.final:
        from search.final_stage.stage import run_final

        run_final(s, trials, clock=clock, split=split)
    if split:  # before the report, so that the report shows how this run split its time
        split.final = clock.elapsed() - split.startup - split.search
        split.write(exp)
    if s.report:
        from search.reporting.page import report_at_end

        report_at_end(exp)
    if split:  # again with the report's seconds
        split.final = clock.elapsed() - split.startup - split.search
        split.write(exp)
        print(split.line())
    return 0


def failed_trials(results) -> dict[str, str]:
    """Trial id -> error of every trial Tune's result grid says failed.

    Tune's snapshot on disk can miss a failure that came last (it saves it at most every few
    seconds), so the statuses read back from disk are corrected with these.
    """
    out = {}
    for result in results:
        if result.error is not None and result.path:
            out[Path(result.path).name.removeprefix("trial_")] = last_line(str(result.error))
    return out


def _interrupted(trials: list[TrialRecord], s: Settings, budget: SearchBudget | None) -> bool:
    """Whether Ctrl-C stopped the search: trials left unfinished without the time budget stopping it."""
    unfinished = any(t.status in UNFINISHED for t in trials) or len(trials) < s.num_samples
    return bool(unfinished) and not (budget and budget.stopped_at)


def build_parser() -> Parser:
    """The command line: one flag per field of `search.tuning.settings.Settings`, where each is declared."""
    return settings_parser()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m search.run`: the whole experiment; raises UserError on bad input. --time-budget counts from
    `command_started(argv)` (the process's start on the command line)."""
    started = command_started(argv)
    return run_search(parse_settings(argv), started=started)


if __name__ == "__main__":
    sys.exit(run_cli(main))

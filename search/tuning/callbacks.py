"""Tune plug-ins of the search: trials.csv kept current while it runs, the time-budget stopper, the searcher,
and the console a person watches (`SearchConsole`)."""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback, Stopper
from ray.tune.search.optuna import OptunaSearch

from search.tuning.budget import Measured, active
from search.tuning.console import REDRAW_EVERY, Console, clock_text, counted, trial_summary
from search.tuning.records import TrialRecord, error_text, records_of, trial_status, trials_table
from search.tuning.storage import prune_checkpoints, resolve
from search.tuning.study import TRIAL_ATTR, MirroredStorage, resumed_url
from trainables.files import write_csv
from trainables.metrics import METRIC

OUTCOMES = {"ERROR": "failed", "DIVERGED": "diverged", "COMPLETED": "completed", "STOPPED": "stopped",
            "RUNNING": "running", "OVER_LATENCY": "stopped"}  # trials.csv's status -> the console's word


class TrialsCsvWriter(Callback):
    """Rewrite trials.csv whenever a trial finishes or fails, and when the experiment ends.

    So the table exists, and is current, whatever happens to the driver afterwards (a kill, a
    crash): it is written from the driver's live trials, whose statuses are always up to date
    (Tune's experiment snapshot on disk may lag behind the last failure). `records` holds the
    trials of the last table and `ended` says whether Tune reached the end of the experiment.
    """

    def __init__(self, experiment_dir: Path, max_epochs: int) -> None:
        self.experiment_dir, self.max_epochs = Path(experiment_dir), max_epochs
        self.records: list[TrialRecord] | None = None
        self.ended = False

    def write(self, trials, ray_status: dict[str, str] | None = None) -> None:
        self.records = records_of(trials, self.max_epochs, ray_status=ray_status)
        write_csv(trials_table(self.records), self.experiment_dir / "trials.csv")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.write(trials, {trial.trial_id: "TERMINATED"})  # Tune marks it so after the callbacks

    def on_trial_error(self, iteration, trials, trial, **info):
        self.write(trials, {trial.trial_id: "ERROR"})

    def on_experiment_end(self, trials, **info):
        self.write(trials)
        self.ended = True


class TrialLogsKept(Callback):
    """Copy a failed trial's result.json and progress.csv into the experiment before Tune retries it.

    Tune's loggers start a retried trial's files again from the experiment's copy (their
    `_restore_from_remote` on the trial's start), which is only as recent as Tune's last sync of the
    driver's staging folder: without this copy a retry lost the rows reported since (the report's
    learning curves, `benchmarks/fidelity.py` and the tests read result.json). Tune calls
    `on_trial_recover` as the trial fails, before it is started again.
    """

    def on_trial_recover(self, iteration, trials, trial, **info):
        import pyarrow.fs
        from ray.tune.result import EXPR_PROGRESS_FILE, EXPR_RESULT_FILE  # the names the loggers restore

        fs, remote = trial.storage.storage_filesystem, trial.storage.trial_fs_path
        for name in (EXPR_RESULT_FILE, EXPR_PROGRESS_FILE):
            local = os.path.join(trial.local_path, name)
            if not os.path.exists(local) or (isinstance(fs, pyarrow.fs.LocalFileSystem)
                                             and os.path.realpath(local) == os.path.realpath(f"{remote}/{name}")):
                continue
            fs.create_dir(remote, recursive=True)
            pyarrow.fs.copy_files(local, f"{remote}/{name}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)


class CheckpointPruner(Callback):
    """Keep each trial's latest checkpoint and delete the older ones once Tune's saved experiment state no
    longer needs them (`search.tuning.storage.prune_checkpoints`), at most every `every` seconds; the
    search runs with Tune keeping every checkpoint, and calls `prune(final=True)` after the Tuner ends.
    """

    def __init__(self, tune_uri: str, every: float = 30.0) -> None:
        self.fs, self.path = resolve(tune_uri)
        self.every, self._last = every, time.monotonic()
        self.waiting: set[str] = set()  # trials with checkpoints the saved state may still need

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self.waiting.add(trial.trial_id)

    def on_step_end(self, iteration, trials, **info):
        if self.waiting and time.monotonic() - self._last >= self.every:
            self.prune()

    def prune(self, final: bool = False) -> None:
        self._last = time.monotonic()
        self.waiting -= prune_checkpoints(self.fs, self.path, None if final else sorted(self.waiting))


class BudgetStopper(Stopper):
    """Stop the whole search when only the final stage's share of --time-budget is left.

    Installed in every search (a search started without a budget may be resumed with one);
    it remembers each trial's last measured speed and asks the running command's budget
    (`search.tuning.budget.active`), which is None without --time-budget.
    """

    def __init__(self) -> None:
        self.measured: dict[str, Measured] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.measured[trial_id] = Measured.of_result(result)
        return False

    def stop_all(self) -> bool:
        budget = active()
        return budget is not None and budget.search_over(list(self.measured.values()))


LATENCY_ATTR = "latency_ms"  # an Optuna trial's user attribute: its model's latency for one face


@dataclass(frozen=True)
class LatencyConstraint:
    """TPE's `constraints_func` for --max-latency-ms: a trial is feasible when its latency minus `limit` is <= 0
    (a trial that never reported one, an error, counts as feasible: it says nothing about the limit). A class,
    not a closure: Tune pickles the searcher, and its sampler, with every experiment snapshot."""

    limit: float

    def __call__(self, frozen_trial) -> list[float]:
        return [float(frozen_trial.user_attrs.get(LATENCY_ATTR, self.limit)) - self.limit]


def latency_constraint(limit: float) -> LatencyConstraint:
    """The constraint of --max-latency-ms `limit` (see `LatencyConstraint`)."""
    return LatencyConstraint(limit)


class TrackedOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, with each Optuna trial labelled by its Tune trial id (`search.tuning.study.TRIAL_ATTR`),
    and `optuna.db` rewritten from the snapshot it is restored from (`search.tuning.study.MirroredStorage`).

    So a trial in `optuna.db` (the dashboard, the report) can be matched to its row of
    trials.csv and its Tune folder; Ray's own class keeps that mapping only in memory.
    """

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        if isinstance(self._storage, MirroredStorage):
            self._storage.attach(resumed_url())

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if config is not None and ot_trial is not None and TRIAL_ATTR not in ot_trial.user_attrs:
            ot_trial.set_user_attr(TRIAL_ATTR, trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Tune hands the result of a trial its scheduler stops to on_trial_complete only, never to
        # on_trial_result: report it too, so the study's learning curve of that trial is whole.
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and result and "latency_ms" in result and trial_id not in self._completed_trials:
            # before the tell below: TPE reads the constraint (latency_constraint) when the trial completes
            ot_trial.set_user_attr(LATENCY_ATTR, float(result["latency_ms"]))
        step = (result or {}).get("training_iteration")
        if (ot_trial is not None and step is not None and result.get(self.metric) is not None
                and trial_id not in self._completed_trials):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna ignores, with a warning, a step already reported
                ot_trial.report(result[self.metric], step)
        super().on_trial_complete(trial_id, result=result, error=error)


class SearchConsole(Callback):
    """A Tune callback that prints one line per trial event and keeps the status line current.

    Events: started (its key hyperparameters), stopped by ASHA at a rung, stopped by the time
    budget, completed, diverged, failed and retried, failed (the reason's last line). The status line: elapsed of the
    budget, trials completed / running / stopped / failed (counted from Tune's own trials, so a
    resumed search counts the trials it restored), the best objective and its trial, and, under
    --time-budget, when the final stage is planned to start. `budget` gives the running search's
    `SearchBudget` (or None); `rungs` are ASHA's rungs (epochs).
    """

    def __init__(self, console: Console, *, max_epochs: int, rungs: list[int], num_samples: int,
                 budget: Callable[[], Any] = lambda: None, started: float | None = None):
        self.console, self.max_epochs, self.rungs, self.num_samples = console, max_epochs, rungs, num_samples
        self.budget, self.started = budget, started or time.time()
        self.trials: list = []
        self.measured: dict[str, Measured] = {}
        self._drawn = -math.inf

    def outcome(self, trial) -> str:
        """completed, stopped, diverged, failed, running or pending: trials.csv's status, in words."""
        last = trial.last_result or {}
        status = trial_status(trial.status, last, int(last.get("training_iteration", 0) or 0), self.max_epochs)
        return OUTCOMES.get(status, "pending")

    def best(self) -> tuple[float, str] | None:
        scored = [(float((t.last_result or {}).get(METRIC, math.nan)), t.trial_id) for t in self.trials]
        scored = [p for p in scored if math.isfinite(p[0])]
        return max(scored) if scored else None

    def status_text(self) -> str:
        budget = self.budget()
        elapsed = time.time() - (budget.clock.started if budget else self.started)
        # 0:00:59 / 1:00:00, not 0:59 / 1:00:00 (read as 59 minutes of 60)
        head = (f"{clock_text(elapsed, hours=budget.clock.total >= 3600)} / {clock_text(budget.clock.total)}"
                if budget else clock_text(elapsed))
        counts = {k: 0 for k in ("completed", "running", "stopped", "diverged", "failed")}
        for trial in self.trials:
            kind = self.outcome(trial)
            counts[kind] = counts.get(kind, 0) + 1
        text = (f"[{head}] trials: {counts['completed']} completed, {counts['running']} running, "
                f"{counts['stopped'] + counts['diverged']} stopped, {counts['failed']} failed (of {self.num_samples})")
        best = self.best()
        if best:
            text += f" | best {100 * best[0]:.1f}% ({best[1]})"
        if budget and budget.final:
            if budget.stopped_at:
                text += " | final stage next"
            elif self.measured:
                start = budget.clock.left() - budget.reserve(list(self.measured.values()))
                text += f" | final stage in ~{clock_text(max(0.0, start))}"
        return text

    def redraw(self, trials, force: bool = False) -> None:
        self.trials = trials
        now = time.monotonic()
        if force or now - self._drawn >= REDRAW_EVERY:
            self._drawn = now
            self.console.status(self.status_text())

    # Tune's callback hooks (ray.tune.Callback)
    def on_step_end(self, iteration, trials, **info):
        self.redraw(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.console.event(f"trial {trial.trial_id} started: {trial_summary(trial.config)}")
        self.redraw(trials, force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.measured[trial.trial_id] = Measured.of_result(result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        epochs = int(last.get("training_iteration", 0) or 0)
        figure = f"PublicTest {100 * last['best_val_acc']:.1f}%" if "best_val_acc" in last else "no epoch reported"
        budget = self.budget()
        if last.get("over_latency"):
            what, figure = "not trained", last.get("error", "over --max-latency-ms")
        elif last.get("diverged"):
            what = f"diverged in epoch {epochs}"
            figure = f"{figure} before it"
        elif epochs >= self.max_epochs:
            what = f"completed {counted(epochs, 'epoch')}"
        elif budget is not None and budget.stopped_at:
            what = f"stopped by the time budget after epoch {epochs}"
        elif epochs in self.rungs:
            what = f"stopped by ASHA at rung {self.rungs.index(epochs) + 1} (epoch {epochs})"
        else:
            what = f"stopped after epoch {epochs}"
        self.console.event(f"trial {trial.trial_id} {what}: {figure}")
        self.redraw(trials, force=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.console.event(f"trial {trial.trial_id} failed, retried from its last checkpoint: "
                           f"{error_text(trial) or 'see its error.txt'}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.console.event(f"trial {trial.trial_id} failed: {error_text(trial) or 'see its error.txt'}")
        self.redraw(trials, force=True)

    def on_experiment_end(self, trials, **info):
        self.trials = trials
        self.console.close()
        self.console.event(self.status_text())

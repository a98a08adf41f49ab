"""Tune callbacks of the search: trials.csv kept current while the search runs, and the time-budget stopper."""
from __future__ import annotations

import math
from pathlib import Path

from ray.tune import Callback, Stopper

from search.budget import Measured, active
from search.export import TrialRecord, records_of, trials_table
from trainables.files import write_csv
from trainables.metrics import METRIC


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


class BudgetStopper(Stopper):
    """Stop the whole search when only the final stage's share of --time-budget is left.

    Installed in every search (a search started without a budget may be resumed with one);
    it remembers each trial's last measured speed and asks the running command's budget
    (`search.budget.active`), which is None without --time-budget.
    """

    def __init__(self) -> None:
        self.measured: dict[str, Measured] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.measured[trial_id] = Measured(result.get(METRIC, math.nan), result.get("time_this_iter_s", math.nan),
                                           result.get("images_per_s", math.nan))
        return False

    def stop_all(self) -> bool:
        budget = active()
        return budget is not None and budget.search_over(list(self.measured.values()))

"""Tune plug-ins of the search: trials.csv kept current while it runs, the time-budget stopper, the searcher."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

from ray.tune import Callback, Stopper
from ray.tune.search.optuna import OptunaSearch

from search.tuning.budget import Measured, active
from search.tuning.records import TrialRecord, records_of, trials_table
from search.tuning.study import TRIAL_ATTR, MirroredStorage, resumed_url
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
    (`search.tuning.budget.active`), which is None without --time-budget.
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
        step = (result or {}).get("training_iteration")
        if (ot_trial is not None and step is not None and result.get(self.metric) is not None
                and trial_id not in self._completed_trials):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna ignores, with a warning, a step already reported
                ot_trial.report(result[self.metric], step)
        super().on_trial_complete(trial_id, result=result, error=error)

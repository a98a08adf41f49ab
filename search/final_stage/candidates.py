"""Choosing what the final stage retrains: the top-k trials of the search by PublicTest accuracy."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

from search.tuning.records import TrialRecord
from trainables.config import TrialConfig

# Statuses whose val_acc does not describe a working configuration.
SKIPPED_STATUSES = ("ERROR", "DIVERGED")


@dataclass(frozen=True)
class Candidate:
    """One configuration chosen for retraining: its rank in the search, trial id, config and PublicTest accuracy."""

    rank: int
    trial_id: str
    config: TrialConfig
    search_val_acc: float

    @property
    def name(self) -> str:
        return f"top{self.rank}-{self.trial_id}"


def select_candidates(trials: Sequence[TrialRecord], top_k: int) -> list[Candidate]:
    """The `top_k` trials with the best objective, skipping errored and diverged ones.

    The configs come from Tune's own record of each trial, typed once by `TrialConfig`. A
    trial that found its rate with the LR range test is retrained at that rate (no second
    range test, which could find another rate than the one that earned its place).
    """
    ok = [t for t in trials if math.isfinite(t.objective) and t.status not in SKIPPED_STATUSES]
    ok = sorted(ok, key=lambda t: -t.objective)[:top_k]  # stable: ties keep the search's order
    return [Candidate(rank=i, trial_id=t.trial_id, config=retrain_config(t), search_val_acc=float(t.objective))
            for i, t in enumerate(ok, start=1)]


def retrain_config(trial: TrialRecord) -> TrialConfig:
    """The config the final stage retrains: the trial's, with a range-tested rate fixed to the rate it found."""
    config = TrialConfig.from_dict(trial.config)
    if config.lr_mode == "range_test" and math.isfinite(trial.found_lr):
        config = dataclasses.replace(config, lr=float(trial.found_lr), lr_mode="searched")
    return config

"""Choosing what the final stage retrains: the top-k distinct trials of the search by PublicTest accuracy.

Distinct: a trial that makes every choice of a better one (architecture, optimizer, schedule,
augmentation...) with every number within NEAR_FACTOR of it is a near copy, retrained only when
the search found nothing else. TPE spends many trials refining its best configuration, and
without this rule the top-k of an hour were variants of one recipe: an ensemble of near copies
gains less than one of different models, and a second seed measures a configuration's spread
better than a near copy does.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

from search.tuning.records import TrialRecord
from trainables.config import TrialConfig

# Statuses whose val_acc does not describe a working configuration.
SKIPPED_STATUSES = ("ERROR", "DIVERGED", "OVER_LATENCY")
# Two configurations with the same choices whose every number is within this factor of the other's
# are near copies (a rate of 3e-3 and one of 2e-3; a warm-up of 0.3 and 0.45 of the run).
NEAR_FACTOR = 2.0


@dataclass(frozen=True)
class Candidate:
    """One configuration chosen for retraining: its rank in the search, trial id, config and PublicTest accuracy."""

    rank: int
    trial_id: str
    config: TrialConfig
    search_val_acc: float
    near_copy_of: str = ""  # the better candidate's trial id, when the search found nothing distinct to take
    prefix: str = ""  # "distilled-" for the student trained from the ensemble (search.final_stage.student)

    @property
    def name(self) -> str:
        return f"{self.prefix}top{self.rank}-{self.trial_id}"


def near_copy(a: dict, b: dict) -> bool:
    """Whether configs `a` and `b` (Tune's dicts) make the same choices with every number within NEAR_FACTOR.

    Values that differ in kind (a string, a flag, a key only one has) or in sign, or where one
    is zero and the other not (no label smoothing against some), make the configs distinct.
    """
    if a.keys() != b.keys():
        return False
    for key, x in a.items():
        y = b[key]
        if x == y:
            continue
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
        if numbers and math.isnan(x) and math.isnan(y):  # a key both left out (a table's blank)
            continue
        if not numbers or math.isnan(x) or math.isnan(y) or x <= 0 or y <= 0 or max(x, y) > NEAR_FACTOR * min(x, y):
            return False
    return True


def select_candidates(trials: Sequence[TrialRecord], top_k: int) -> list[Candidate]:
    """The `top_k` best distinct trials by objective, skipping errored and diverged ones.

    Best first; a near copy of a better pick (`near_copy`) is passed over while a distinct trial
    is left, and fills the remaining places, best first, only when the search found nothing else.
    The configs come from Tune's own record of each trial, typed once by `TrialConfig`. A
    trial that found its rate with the LR range test is retrained at that rate (no second
    range test, which could find another rate than the one that earned its place).
    """
    ok = [t for t in trials if math.isfinite(t.objective) and t.status not in SKIPPED_STATUSES]
    ranked = list(enumerate(sorted(ok, key=lambda t: -t.objective), start=1))  # stable: ties keep the search's order
    picked: list[tuple[int, TrialRecord, str]] = []
    copies: list[tuple[int, TrialRecord, str]] = []
    for rank, t in ranked:
        like = next((p.trial_id for _, p, _ in picked if near_copy(t.config, p.config)), "")
        (copies if like else picked).append((rank, t, like))
    chosen = (picked + copies)[:top_k]
    return [Candidate(rank=rank, trial_id=t.trial_id, config=retrain_config(t), search_val_acc=float(t.objective),
                      near_copy_of=like) for rank, t, like in chosen]


def retrain_config(trial: TrialRecord) -> TrialConfig:
    """The config the final stage retrains: the trial's, with a range-tested rate fixed to the rate it found."""
    config = TrialConfig.from_dict(trial.config)
    if config.lr_mode == "range_test" and math.isfinite(trial.found_lr):
        config = dataclasses.replace(config, lr=float(trial.found_lr), lr_mode="searched")
    return config

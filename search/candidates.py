"""Choosing what the final stage retrains: the top-k trials of the search by PublicTest accuracy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from search.export import TrialRecord
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
    """The `top_k` trials with the best PublicTest accuracy, skipping errored and diverged ones.

    The configs come from Tune's own record of each trial, typed once by `TrialConfig`.
    """
    ok = [t for t in trials if t.val_acc == t.val_acc and t.status not in SKIPPED_STATUSES]  # not NaN
    ok = sorted(ok, key=lambda t: -t.val_acc)[:top_k]  # stable: ties keep the search's order
    return [Candidate(rank=i, trial_id=t.trial_id, config=TrialConfig.from_dict(t.config),
                      search_val_acc=float(t.val_acc)) for i, t in enumerate(ok, start=1)]

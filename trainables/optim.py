"""Optimizers and learning-rate schedules, each a registry keyed by the names configs use.

`build_optimizer(name, params, ...)` and `Schedule(optimizer, name, ...)` are what a
training run and the LR range test call; nothing here knows about data or Ray.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from trainables.errors import UserError


def _sgd(params, *, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)


def _adam(params, *, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


def _adamw(params, *, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}


def build_optimizer(name: str, params, *, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """Build the optimizer `name` (SGD uses Nesterov momentum; Adam/AdamW use it as beta1)."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{name}'; choose from {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay, momentum=momentum)


# --------------------------------------------------------------------------- schedules
# One small class instead of torch.optim.lr_scheduler: every schedule here has a
# warm-up, and torch cannot chain a warm-up with ReduceLROnPlateau (SequentialLR
# rejects it). A multiplier computed from (step, plateau scale) composes all of
# them, and its state is three numbers, which makes checkpoints trivial.

def _cosine(t: float, s: "Schedule") -> float:
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _onecycle(t: float, s: "Schedule") -> float:
    # Smith's one-cycle: the warm-up climbs from lr/25 (see Schedule.factor), then cosine to lr/1e4.
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _step(t: float, s: "Schedule") -> float:
    # A cut every `step_fraction` of the run after the warm-up: the same cuts, at the same points of
    # the run, for a 10-epoch trial and a 40-epoch final run (none at the very last step).
    return s.step_gamma ** int(min(t, 1.0 - 1e-9) // max(s.step_fraction, 1e-3))


def _constant(t: float, s: "Schedule") -> float:
    return 1.0


SCHEDULES: dict[str, Callable[[float, "Schedule"], float]] = {
    "cosine": _cosine, "onecycle": _onecycle, "step": _step, "plateau": _constant, "constant": _constant,
}


@dataclass
class Schedule:
    """Per-step learning-rate multiplier with linear warm-up; `plateau` also cuts on stalled PublicTest accuracy.

    Every setting is a fraction of the run (`warmup_fraction`, `step_fraction`, `patience_fraction`),
    so one configuration has one shape at any length: the search's 10-epoch trials and the final
    stage's 40-epoch runs warm up, cut and anneal at the same points of their runs.
    """

    optimizer: torch.optim.Optimizer
    name: str
    epochs: int
    steps_per_epoch: int
    warmup_fraction: float = 0.0
    step_fraction: float = 0.25
    step_gamma: float = 0.1
    patience_fraction: float = 0.2
    plateau_factor: float = 0.3
    step_count: int = 0
    plateau_scale: float = 1.0
    best: float = -math.inf
    bad_epochs: int = 0
    base_lrs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise UserError(f"unknown schedule '{self.name}'; choose from {sorted(SCHEDULES)}")
        if not self.base_lrs:
            self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self._apply()

    @property
    def warmup_steps(self) -> int:
        if self.name == "onecycle":  # one-cycle always climbs; 30% of training unless warm-up says otherwise
            frac = self.warmup_fraction if self.warmup_fraction > 0 else 0.3
            return max(1, int(min(max(frac, 0.05), 0.5) * self.total_steps))
        # Capped at half of training: a warm-up that long would leave the schedule nothing.
        return int(min(max(self.warmup_fraction, 0.0), 0.5) * self.total_steps)

    @property
    def plateau_patience(self) -> int:
        """Epochs without a new best before a cut: `patience_fraction` of the run, at least one."""
        return max(1, round(self.patience_fraction * self.epochs))

    @property
    def total_steps(self) -> int:
        return max(1, self.epochs * self.steps_per_epoch)

    def factor(self) -> float:
        """The multiplier on the base learning rate at the current step."""
        w = self.warmup_steps
        if self.step_count < w:
            start = 1 / 25 if self.name == "onecycle" else 0.0
            return start + (1 - start) * (self.step_count + 1) / w
        t = (self.step_count - w) / max(1, self.total_steps - w)
        return SCHEDULES[self.name](t, self) * self.plateau_scale

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def replan(self, epochs: int) -> None:
        """Make the run `epochs` long from here on: the settings being fractions of the run, what is left of
        the warm-up, cuts and annealing happens over the shorter run (the final stage under a time budget)."""
        self.epochs = epochs
        self._apply()

    def step_batch(self) -> None:
        """Advance one optimizer step."""
        self.step_count += 1
        self._apply()

    def step_epoch(self, val_acc: float) -> None:
        """End of an epoch: `plateau` cuts the rate after `plateau_patience` epochs without a new best.

        Epochs that end inside the warm-up are not counted: cuts counted there would all land
        at once when the warm-up ends.
        """
        if self.name != "plateau":
            return
        if self.step_count <= self.warmup_steps:  # an epoch of warm-up is no plateau, however flat
            self.best = max(self.best, val_acc)
            return
        if val_acc > self.best + 1e-4:
            self.best, self.bad_epochs = val_acc, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.plateau_patience:
                self.plateau_scale *= self.plateau_factor
                self.bad_epochs = 0
        self._apply()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "plateau_scale": self.plateau_scale, "best": self.best,
                "bad_epochs": self.bad_epochs, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self._apply()



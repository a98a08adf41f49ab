"""LR range test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2017).

The sweep itself is torch-lr-finder's `LRFinder`: an exponential ramp of the
learning rate over a few hundred steps, exponentially smoothed loss, a stop once
the loss passes 5x its best, and the model and optimizer restored afterwards. We
feed it our own batches (sliced from the in-memory tensor and augmented on the
device) through a `DataLoader` over indices, and report its suggestion rule:
the learning rate where the smoothed loss falls fastest ("steepest gradient"), but
searched only before the loss's minimum: with batch norm the loss often falls again
after blowing up, and the plain rule then picks a rate past the blow-up (1.1 for
SGD on FER2013, where the minimum is at 0.04). torch-lr-finder is imported
where it is used, so that a trial (or benchmarks/gpu_check.py on a bare GPU machine) that
never runs the test does not need it.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from trainables.augment import normalize, to_input
from trainables.optim import build_optimizer

RULE = ("steepest descent of the smoothed loss before its first minimum (torch-lr-finder's rule, "
        "limited to the falling part of the curve), skipping the sweep's first 0.65 decades")
BLOWUP = 1.2  # the smoothed loss this many times its lowest so far: the sweep has blown up
# The rule was set on sweeps of 100 steps over 6.5 decades (1e-6 to 3): it skips the first 10
# points and reads a loss smoothed with torch-lr-finder's factor 0.05, whose lag is 19 steps. A
# trial's sweep is often much shorter (20-50 steps at an hour's sizes), where 10 points are half
# the sweep (no low rate could be suggested) and a 19-step lag is most of it. So both are fixed in
# decades, not steps: the skip covers SKIP_DECADES and the smoothing lags by LAG_DECADES at any length.
SKIP_DECADES = 10 * 6.5 / 100
LAG_DECADES = 19 * 6.5 / 100


# Where each optimizer's good rates lie: the spaces' searched ranges (spaces.LR_RANGES, which a test
# keeps equal). A trial's test sweeps a decade either side of them, rather than the 6.5 decades from
# 1e-6 to 3, so that a short sweep spends its steps where the answer can be; and its suggestion is
# clipped to them, since a short sweep on noisy FER2013 batches sometimes finds its minimum at its
# very start and falls back to a tenth of that (1e-5 for SGD, measured: benchmarks/range_test.py).
GOOD_RATES = {"sgd": (1e-3, 0.3), "adam": (1e-4, 1e-2), "adamw": (1e-4, 1e-2)}
SWEEP = {name: (low / 10, high * 10) for name, (low, high) in GOOD_RATES.items()}


def within_good_rates(optimizer: str, lr: float) -> float:
    """`lr` clipped to where `optimizer`'s good rates lie (GOOD_RATES)."""
    low, high = GOOD_RATES[optimizer]
    return float(min(max(lr, low), high))


def _decades_per_step(start_lr: float, end_lr: float, steps: int) -> float:
    return float(np.log10(end_lr / start_lr)) / max(1, steps)


def smoothing(start_lr: float, end_lr: float, steps: int) -> float:
    """torch-lr-finder's `smooth_f` whose lag, (1 - f) / f steps, spans LAG_DECADES of this sweep (0.05 at 100
    steps over 6.5 decades, its default)."""
    lag_steps = LAG_DECADES / _decades_per_step(start_lr, end_lr, steps)
    return min(1.0, 1.0 / (1.0 + lag_steps))


def skip_points(lrs: list[float]) -> int:
    """How many first points the rule skips: those within SKIP_DECADES of the sweep's start (10 of 100 over 6.5)."""
    if len(lrs) < 2:
        return 0
    per_step = float(np.log10(lrs[-1] / lrs[0])) / (len(lrs) - 1)
    return int(round(SKIP_DECADES / per_step)) if per_step > 0 else 0


@contextlib.contextmanager
def _quiet():
    import torch_lr_finder.lr_finder as _finder_module

    saved = _finder_module.tqdm
    _finder_module.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        _finder_module.tqdm = saved


def lr_range_test(model: torch.nn.Module, train, *, optimizer: str = "sgd", batch_size: int = 64,
                  weight_decay: float = 0.0, momentum: float = 0.9, augment=None,
                  device: torch.device | None = None, generator: torch.Generator | None = None,
                  start_lr: float = 1e-6, end_lr: float = 3.0, steps: int = 100,
                  smooth_f: float | None = None) -> dict:
    """Sweep the LR exponentially from `start_lr` to `end_lr` over `steps` batches of `train`.

    `train` is a `trainables.device.DeviceSplit`. The model and its weights are
    left as they were. Returns `suggested_lr`, the rule, and the curve (`lrs`,
    `losses`); the suggestion is clipped to the swept range. `smooth_f` defaults to `smoothing`'s.
    """
    device = device or next(model.parameters()).device
    n = len(train)
    order = torch.randperm(n, generator=generator)

    def collate(idx: list[int]):
        # Cycle through a fixed shuffled order: the sweep may need more batches than one epoch.
        sel = order[torch.tensor(idx) % n].to(train.x.device)
        x, target = to_input(train.x[sel]), train.target[sel]
        if augment is not None:
            x, target = augment(x, target)
        return normalize(x), target

    loader = DataLoader(range(steps * batch_size), batch_size=batch_size, shuffle=False, collate_fn=collate)
    opt = build_optimizer(optimizer, model.parameters(), lr=start_lr, weight_decay=weight_decay,
                          momentum=momentum)
    from torch_lr_finder import LRFinder

    finder = LRFinder(model, opt, F.cross_entropy, device=device)  # takes soft targets too
    # The finder prints a progress bar and chatty lines; in a trial's log they are noise
    # (and tqdm reads its off-switch only at import, which Ray's workers did long before).
    with _quiet():
        finder.range_test(loader, end_lr=end_lr, num_iter=steps, step_mode="exp",
                          smooth_f=smoothing(start_lr, end_lr, steps) if smooth_f is None else smooth_f)
    lrs, losses = list(finder.history["lr"]), list(finder.history["loss"])
    finder.reset()
    return {"suggested_lr": suggest_lr(lrs, losses), "rule": RULE, "lrs": lrs, "losses": losses}


def suggest_lr(lrs: list[float], losses: list[float], skip: int | None = None) -> float:
    """The LR where the smoothed loss falls fastest, between `skip_points` and the loss's first minimum.

    The curve is first cut where the loss rises `BLOWUP` times above its lowest value so far,
    so a second descent after a blow-up never counts.
    """
    loss = np.asarray(losses, dtype=float)
    loss[~np.isfinite(loss)] = np.inf
    blown = np.nonzero(loss > BLOWUP * np.minimum.accumulate(loss))[0]
    loss = loss[: blown[0]] if len(blown) else loss
    lo, hi = skip_points(lrs) if skip is None else skip, int(np.argmin(loss)) + 1
    if hi - lo < 3:  # the minimum comes (almost) first: one tenth of its rate, the usual fallback
        return float(lrs[hi - 1]) / 10
    grads = np.gradient(loss[lo:hi])
    return float(lrs[lo + int(np.argmin(grads))])

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
        "limited to the falling part of the curve), skipping the first 10 points")
SKIP_START = 10
BLOWUP = 1.2  # the smoothed loss this many times its lowest so far: the sweep has blown up


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
                  start_lr: float = 1e-6, end_lr: float = 3.0, steps: int = 100) -> dict:
    """Sweep the LR exponentially from `start_lr` to `end_lr` over `steps` batches of `train`.

    `train` is a `trainables.device.DeviceSplit`. The model and its weights are
    left as they were. Returns `suggested_lr`, the rule, and the curve (`lrs`,
    `losses`); the suggestion is clipped to the swept range.
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
        finder.range_test(loader, end_lr=end_lr, num_iter=steps, step_mode="exp")
    lrs, losses = list(finder.history["lr"]), list(finder.history["loss"])
    finder.reset()
    return {"suggested_lr": suggest_lr(lrs, losses), "rule": RULE, "lrs": lrs, "losses": losses}


def suggest_lr(lrs: list[float], losses: list[float]) -> float:
    """The LR where the smoothed loss falls fastest, between `SKIP_START` and the loss's first minimum.

    The curve is first cut where the loss rises `BLOWUP` times above its lowest value so far,
    so a second descent after a blow-up never counts.
    """
    loss = np.asarray(losses, dtype=float)
    loss[~np.isfinite(loss)] = np.inf
    blown = np.nonzero(loss > BLOWUP * np.minimum.accumulate(loss))[0]
    loss = loss[: blown[0]] if len(blown) else loss
    lo, hi = SKIP_START, int(np.argmin(loss)) + 1
    if hi - lo < 3:  # the minimum comes (almost) first: one tenth of its rate, the usual fallback
        return float(lrs[hi - 1]) / 10
    grads = np.gradient(loss[lo:hi])
    return float(lrs[lo + int(np.argmin(grads))])

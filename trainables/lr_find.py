"""LR range test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2017).

The sweep itself is torch-lr-finder's `LRFinder`: an exponential ramp of the
learning rate over a few hundred steps, exponentially smoothed loss, a stop once
the loss passes 5x its best, and the model and optimizer restored afterwards. We
feed it our own batches (sliced from the in-memory tensor and augmented on the
device) through a `DataLoader` over indices, and report its suggestion rule:
the learning rate where the smoothed loss falls fastest ("steepest gradient").
"""
from __future__ import annotations

import contextlib
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
import torch_lr_finder.lr_finder as _finder_module
from torch_lr_finder import LRFinder

from trainables.augment import normalize, to_input

RULE = "steepest gradient of the smoothed loss (torch-lr-finder), skipping the first 10 and last 5 points"
SKIP_START, SKIP_END = 10, 5


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


@contextlib.contextmanager
def _quiet():
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

    `train` is a `trainables.train.DeviceSplit`. The model and its weights are
    left as they were. Returns `suggested_lr`, the rule, and the curve (`lrs`,
    `losses`); the suggestion is clipped to the swept range.
    """
    from trainables.train import build_optimizer  # local: train.py imports this module lazily too

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
    finder = LRFinder(model, opt, _soft_cross_entropy, device=device)
    # The finder prints a progress bar and chatty lines; in a trial's log they are noise
    # (and tqdm reads its off-switch only at import, which Ray's workers did long before).
    with _quiet():
        finder.range_test(loader, end_lr=end_lr, num_iter=steps, step_mode="exp")
    lrs, losses = list(finder.history["lr"]), list(finder.history["loss"])
    finder.reset()
    return {"suggested_lr": suggest_lr(lrs, losses), "rule": RULE, "lrs": lrs, "losses": losses}


def suggest_lr(lrs: list[float], losses: list[float]) -> float:
    """torch-lr-finder's rule: the LR of the steepest descent of the smoothed loss."""
    lo, hi = SKIP_START, len(lrs) - SKIP_END
    if hi - lo < 2:  # too short a curve (it diverged at once): the lowest finite point
        lo, hi = 0, len(lrs)
    grads = np.gradient(np.asarray(losses[lo:hi], dtype=float))
    grads[~np.isfinite(grads)] = np.inf
    return float(lrs[lo + int(np.argmin(grads))])


def plot_curve(result: dict, path: str) -> None:
    """Write the loss-vs-LR curve, with the suggestion marked, as a PNG."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lrs"], result["losses"])
    ax.axvline(result["suggested_lr"], color="red", linestyle="--",
               label=f"suggested {result['suggested_lr']:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title="LR range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

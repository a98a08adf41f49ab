"""One training epoch: the loss and `train_one_epoch` (plain PyTorch, no Ray, no config).

Batches are sliced from the in-memory uint8 tensor on the device and augmented as a
whole; a loss that stops being finite raises `DivergedError`.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainables.augment import normalize
from trainables.device import DeviceSplit, autocast, prepare_batch
from trainables.optim import Schedule


class DivergedError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite; the trial stops."""


def _loss(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None,
          label_smoothing: float) -> torch.Tensor:
    """Cross-entropy on (soft) targets; with class weights, each sample weighs as much as its label.

    Not `F.cross_entropy(weight=...)`: with probability targets torch weights every class term
    of the sum, so label smoothing's small mass on disgust (weight ~16x happy's) taught every
    sample to predict disgust (PublicTest accuracy 12%). Weighting whole samples by their
    (mixed) label matches the usual weighted loss on hard labels and leaves smoothing alone.
    """
    per_sample = F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="none")
    if class_weights is None:
        return per_sample.mean()
    w = target @ class_weights
    return (per_sample * w).sum() / w.sum()



def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
                    data: DeviceSplit, *, batch_size: int, augment, device: torch.device,
                    label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None,
                    sample_weights: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, ema=None) -> dict[str, float]:
    """Train for one pass over `data` (or as many samples drawn by `sample_weights`).

    Batches are sliced from the in-memory uint8 tensor and augmented as a whole on
    the device. Returns mean loss, accuracy and images per second; raises
    `DivergedError` when the loss is not finite. `ema` (an `AveragedModel` of `model`) is updated
    after every step.
    """
    model.train()
    n = len(data)
    if sample_weights is not None:  # class-balanced sampling, with replacement
        order = torch.multinomial(sample_weights, n, replacement=True, generator=generator)
    else:
        order = torch.randperm(n, generator=generator)
    order = order.to(data.x.device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        if len(idx) < 2 and i > 0:  # a batch of one breaks BatchNorm; drop the remainder
            break
        x, target = augment(prepare_batch(data.x[idx], device), data.target[idx])
        with autocast(device):
            logits = model(normalize(x))
        loss = _loss(logits.float(), target, class_weights, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        schedule.step_batch()
        loss_sum += loss.detach() * len(idx)
        if (i // batch_size) % 25 == 24 and not torch.isfinite(loss_sum):  # stop soon, but sync rarely
            raise DivergedError(f"training loss became {float(loss_sum)}")
        correct += (logits.argmax(1) == target.argmax(1)).sum()
        seen += len(idx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    mean_loss = float(loss_sum) / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise DivergedError(f"training loss became {mean_loss}")
    return {"train_loss": mean_loss, "train_acc": float(correct) / max(seen, 1),
            "images_per_s": seen / max(elapsed, 1e-9)}


"""Inference: softmax probabilities with optional test-time augmentation, and PublicTest scoring.

Scoring is always fp32 (training may use bf16 on CUDA), so a score is the same on any
machine. Used by every stage that scores a model: the per-epoch PublicTest evaluation of a trial,
the final stage and `search.evaluate`. Each TTA mode's views are averaged as
probabilities; the modes are reported separately, never mixed.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainables.augment import normalize
from trainables.device import DeviceSplit, prepare_batch
from trainables.errors import UserError

TTA_MODES = ("none", "flip", "tencrop")


def _tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    if mode == "none":
        return [x]
    if mode == "flip":
        return [x, x.flip(-1)]
    if mode == "tencrop":
        # Ten-crop at full size: the reflect-padded image cropped at its four corners and
        # centre (shifts of 4 px, the training crop's range), each also flipped.
        pad = F.pad(x, (4, 4, 4, 4), mode="reflect")
        h, w = x.shape[-2:]
        crops = [pad[..., dy:dy + h, dx:dx + w] for dy, dx in ((0, 0), (0, 8), (8, 0), (8, 8), (4, 4))]
        return crops + [c.flip(-1) for c in crops]
    raise UserError(f"unknown test-time augmentation '{mode}'; choose from {list(TTA_MODES)}")


@torch.no_grad()
def predict(model: nn.Module, x_uint8: torch.Tensor, *, batch_size: int = 512,
            device: torch.device | None = None, tta: str = "none") -> torch.Tensor:
    """Softmax probabilities (N, C) on the CPU, averaged over the test-time views of `tta`."""
    device = device or next(model.parameters()).device
    model.eval()
    with _channels_last(model):
        return _predict(model, x_uint8, batch_size=batch_size, device=device, tta=tta)


@contextlib.contextmanager
def _channels_last(model: nn.Module):
    """The model's weights in channels-last layout while it scores, then as they were.

    fp32 convolutions and pooling run about 1.8x faster so on a CPU (measured: the ConvNet on 350
    faces with ten-crop TTA, 3.2 s -> 2.0 s on 2 cores); trials already train in it (see
    `trainables.device.fast_training`), while weights loaded for scoring arrive contiguous.
    """
    # (A weight over one input channel, the first layer's, reads as both layouts: not a sign.)
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] * p.shape[-2] > 1]
    if not convs or convs[0].is_contiguous(memory_format=torch.channels_last):
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def _predict(model: nn.Module, x_uint8: torch.Tensor, *, batch_size: int, device: torch.device,
             tta: str) -> torch.Tensor:
    out = []
    for i in range(0, len(x_uint8), batch_size):
        x = prepare_batch(x_uint8[i:i + batch_size].to(device), device)
        probs = None
        views = _tta_views(x, tta)
        for view in views:
            # fp32, never autocast: the same weights must score the same on a GPU task and on a
            # CPU driver, or a table could not be reproduced elsewhere (training may be bf16).
            p = model(normalize(view)).float().softmax(1)
            probs = p if probs is None else probs + p
        out.append((probs / len(views)).cpu())
    return torch.cat(out)


def evaluate(model: nn.Module, data: DeviceSplit, *, batch_size: int = 512,
             tta: str = "none") -> dict[str, float]:
    """Accuracy and cross-entropy loss of `model` on `data` (PublicTest during training)."""
    probs = predict(model, data.x, batch_size=batch_size, tta=tta)
    y = data.y.cpu()
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), y).item()
    return {"val_loss": loss, "val_acc": (probs.argmax(1) == y).float().mean().item()}


"""Where training runs: device choice, splits moved to the device once, and batch preparation.

On CUDA a batch is trained in bf16 autocast with channels-last tensors (cudnn autotuned);
on a CPU everything stays fp32. `to_device` moves a whole split at once, so batches are
slices of a tensor already on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainables.augment import to_input
from trainables.data import Split


@dataclass
class DeviceSplit:
    """A split moved once to the training device: uint8 images and float targets (one-hot or votes)."""

    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def to_device(split: Split, num_classes: int, device: torch.device, *, soft: bool = False) -> DeviceSplit:
    """Move a split to `device`; with `soft` the FER+ vote distribution is the training target."""
    y = split.y.to(device)
    if soft and split.soft is not None:
        target = split.soft.to(device, torch.float32)
    else:
        target = F.one_hot(y, num_classes).float()
    return DeviceSplit(x=split.x.to(device), y=y, target=target)


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA when there is one (with cudnn autotuning), else CPU."""
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op elsewhere."""
    # bf16 needs no loss scaling and halves activation memory on recent GPUs; CPU stays fp32.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def prepare_batch(x_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, 48, 48) on `device` -> float (B, 1, 48, 48) in [0, 1], channels-last on CUDA."""
    x = to_input(x_uint8)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


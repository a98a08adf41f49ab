"""Where training runs: device choice, splits moved to the device once, and batch preparation.

On CUDA, and on a CPU with native bf16 instructions (AVX512-BF16 or AMX), a batch is trained
in bf16 autocast with channels-last tensors (cudnn autotuned on CUDA); on other CPUs
everything stays fp32. Scoring is fp32 everywhere (`trainables.inference`). `to_device`
moves a whole split at once, so batches are slices of a tensor already on the device.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trainables.augment import to_input
from trainables.data import EMOTIONS, Split
from trainables.data.ferplus import vote_targets
from trainables.errors import UserError


@dataclass
class DeviceSplit:
    """A split moved once to the training device: uint8 images and float targets (one-hot or votes)."""

    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def to_device(split: Split, num_classes: int, device: torch.device, *, soft: bool = False,
              votes: float = 0.0) -> DeviceSplit:
    """Move a split to `device`; with `soft` its soft labels (FER+ votes, or a teacher's) are the training target,
    with `votes` > 0 that share of the target is the image's FER+ vote distribution over the FER2013 emotions
    (`ferplus.vote_targets`) and the rest its FER2013 label."""
    y = split.y.to(device)
    if soft and split.soft is not None:
        target = split.soft.to(device, torch.float32)
    elif votes:
        if split.votes is None or num_classes != len(EMOTIONS):
            raise UserError("ferplus_votes needs the FER2013 labels with their FER+ votes: put Microsoft's "
                            "fer2013new.csv beside fer2013.csv or pass --ferplus")
        target = vote_targets(split.votes, split.y, votes).to(device)
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


CPU_BF16_ENV = "FER_CPU_BF16"  # "off": train in fp32 on a CPU even where it has native bf16


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (Linux flags avx512_bf16 or amx_bf16) and oneDNN can use it.

    Measured on a 2-core Xeon with AMX (`python benchmarks/throughput.py`): a ConvNet training
    step runs 2.7-3.1x faster in bf16 autocast with channels-last tensors than in fp32. On a CPU
    without these instructions bf16 is emulated and slower than fp32, so it is not used there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return False
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_training(device: torch.device) -> bool:
    """Whether training on `device` uses bf16 autocast and channels-last tensors.

    CUDA: always (bf16 needs no loss scaling and halves activation memory). CPU: where it has
    native bf16 (`cpu_has_native_bf16`), unless FER_CPU_BF16=off.
    """
    if device.type == "cuda":
        return True
    return (device.type == "cpu" and os.environ.get(CPU_BF16_ENV, "auto") != "off"
            and cpu_has_native_bf16())


def autocast(device: torch.device):
    """bf16 autocast where `fast_training`, a no-op elsewhere."""
    return torch.autocast(device.type if device.type in ("cuda", "cpu") else "cpu", dtype=torch.bfloat16,
                          enabled=fast_training(device))


def prepare_batch(x_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, 48, 48) on `device` -> float (B, 1, 48, 48) in [0, 1], channels-last where `fast_training`."""
    x = to_input(x_uint8)
    return x.contiguous(memory_format=torch.channels_last) if fast_training(device) else x


"""Distillation targets: an ensemble's temperature-softened probabilities, mixed with the hard label.

The student is trained with the ordinary loop (`trainables.train`), whose loss is cross-entropy
on soft targets: the target of a Training image is `weight * softmax(log p / T) + (1 - weight) *
one_hot(label)`, where `p` is the ensemble's mean probability of that image. This is Hinton et
al.'s loss with the temperature applied to the teacher only (the student is read at T = 1, as it
will be used), written as one target so that mixup, label smoothing and the class weights treat it
as they treat any soft label. The teacher is computed once, on the un-augmented images (with flip
test-time augmentation), not on every augmented batch: running two or three teachers per batch
would cost the student about as much time as training it again, and under --time-budget those
seconds come out of every run's epochs. Plain PyTorch and numpy; nothing here imports Ray.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from trainables.device import autocast
from trainables.inference import predict

# Chosen on PublicTest with an hour's final stage (docs/model.md, "The distilled student").
TEMPERATURE = 2.0
SOFT_WEIGHT = 0.7
TEACHER_TTA = "flip"
# The student's epochs as a share of the final runs' (at least STUDENT_MIN_EPOCHS), and its peak rate as a
# share of its configuration's: a fine-tune of the best run's trained weights, not a second run from scratch.
STUDENT_SHARE, STUDENT_MIN_EPOCHS, STUDENT_LR_SCALE = 0.25, 2, 0.1


def student_epochs(final_epochs: int) -> int:
    """The student's epochs after final runs of `final_epochs`: STUDENT_SHARE of them, at least STUDENT_MIN_EPOCHS."""
    return max(STUDENT_MIN_EPOCHS, math.ceil(STUDENT_SHARE * final_epochs))


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """`softmax(log p / T)`, row by row: T > 1 flattens the distribution, keeping its order."""
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def distill_targets(teacher_probs: np.ndarray, labels: np.ndarray, *, temperature: float = TEMPERATURE,
                    weight: float = SOFT_WEIGHT) -> torch.Tensor:
    """The student's (N, C) float32 targets: `weight` of the softened teacher, the rest the one-hot label."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the soft targets' weight must be in [0, 1], got {weight}")
    if temperature <= 0:
        raise ValueError(f"the distillation temperature must be positive, got {temperature}")
    probs = np.asarray(teacher_probs, dtype=np.float64)
    onehot = np.eye(probs.shape[1])[np.asarray(labels)]
    return torch.from_numpy((weight * soften(probs, temperature) + (1 - weight) * onehot).astype(np.float32))


def teacher_probs(models: Sequence[nn.Module], x_uint8: torch.Tensor, *, device: torch.device | None = None,
                  tta: str = TEACHER_TTA) -> np.ndarray:
    """The ensemble's mean softmax over `x_uint8` (N, 48, 48) uint8: the average of its members' `predict`.

    In bf16 where training is (`trainables.device.autocast`): unlike a score, a target need not be
    reproducible to the last digit, and on a CPU with native bf16 the pass over Training's 28,709
    faces runs about 3x faster than in fp32.
    """
    device = device or next(models[0].parameters()).device
    total = None
    for model in models:
        with autocast(device):
            p = predict(model, x_uint8, device=device, tta=tta).double()
        total = p if total is None else total + p
    return (total / len(models)).numpy()

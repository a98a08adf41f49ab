"""Distillation targets (`trainables.distill`): softening, the soft/hard mix, the ensemble's mean, the epochs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from trainables.distill import distill_targets, soften, student_epochs, teacher_probs


def test_soften_flattens_a_distribution_and_keeps_its_order():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert soften(p, 1.0) == pytest.approx(p)
    q = soften(p, 2.0)
    assert q.sum(1) == pytest.approx([1.0, 1.0])
    assert (q.argmax(1) == p.argmax(1)).all() and (q.max(1) < p.max(1)).all()
    # T=2 is the square root, renormalised
    root = np.sqrt(p[0]) / np.sqrt(p[0]).sum()
    assert q[0] == pytest.approx(root)
    assert soften(np.array([[1.0, 0.0, 0.0]]), 2.0)[0, 0] == pytest.approx(1.0, abs=1e-5)  # a zero stays (about) zero


def test_distill_targets_mix_the_softened_teacher_with_the_label():
    p = np.array([[0.64, 0.32, 0.04], [0.25, 0.25, 0.5]])
    y = np.array([1, 2])
    t = distill_targets(p, y, temperature=2.0, weight=0.7)
    assert t.dtype == torch.float32 and t.shape == (2, 3)
    expected = 0.7 * soften(p, 2.0) + 0.3 * np.eye(3)[y]
    assert t.numpy() == pytest.approx(expected, abs=1e-6)
    assert t.sum(1).numpy() == pytest.approx([1.0, 1.0])
    assert distill_targets(p, y, weight=0.0).numpy() == pytest.approx(np.eye(3)[y])
    assert distill_targets(p, y, temperature=1.0, weight=1.0).numpy() == pytest.approx(p, abs=1e-6)
    with pytest.raises(ValueError, match="weight"):
        distill_targets(p, y, weight=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distill_targets(p, y, temperature=0.0)


class _Fixed(nn.Module):
    """A 'model' whose logits are the same for every image."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_teacher_probs_is_the_members_mean_softmax():
    x = torch.zeros(5, 48, 48, dtype=torch.uint8)
    a, b = _Fixed([2.0, 0.0, 0.0]), _Fixed([0.0, 0.0, 3.0])
    p = teacher_probs([a, b], x, device=torch.device("cpu"), tta="none")
    expected = (torch.tensor([2.0, 0.0, 0.0]).softmax(0) + torch.tensor([0.0, 0.0, 3.0]).softmax(0)) / 2
    assert p.shape == (5, 3) and p == pytest.approx(np.tile(expected.numpy(), (5, 1)), abs=1e-2)  # bf16 on some CPUs


def test_student_epochs_are_a_quarter_of_the_runs_at_least_two():
    assert [student_epochs(e) for e in (1, 4, 8, 9, 37, 40)] == [2, 2, 2, 3, 10, 10]

"""`trainables.tune_trainable`: when a trial checkpoints (every epoch for small models, rungs and the end always)."""
from __future__ import annotations


def test_checkpoint_policy():
    from trainables.tune_trainable import CHECKPOINT_SHARE, checkpoint_due

    rungs = [2, 6, 10]
    assert checkpoint_due(1, None, 5.0, rungs)  # the first save measures what saving costs
    assert checkpoint_due(3, 0.05, 5.0, rungs)  # a small model: 1% of an epoch, every epoch
    big = 4.0  # a large model on shared storage: 4 s per save
    assert not checkpoint_due(3, big, 60.0, rungs)  # 6.7% of the training since the last save
    assert checkpoint_due(6, big, 60.0, rungs)  # an ASHA rung
    assert checkpoint_due(10, big, 60.0, rungs)  # the last epoch
    assert checkpoint_due(5, big, big / CHECKPOINT_SHARE, rungs)  # enough training since the last save

"""Plain-PyTorch building blocks: data, augmentation, models, optimizers, training, metrics.

Only `trainables.tune_trainable` imports Ray; everything else runs without it.
"""

"""What a trial imports: data, augmentation, models, optimizers and schedules, the LR range test, training,
inference, metrics, calibration and weights files; plain PyTorch.

Only `trainables.tune_trainable` imports Ray; everything else runs without it. Nothing here imports
OpenCV, ONNX, captum or matplotlib at module level (tests/unit/test_layout.py checks a trial's imports).
"""

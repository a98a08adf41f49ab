"""The final stage: choose the candidates from the trials, retrain them over new seeds, score them once on
PrivateTest, and write the stage's tables, error analysis, README and ONNX exports. Plain PyTorch, with Ray
only to spread the retraining runs."""

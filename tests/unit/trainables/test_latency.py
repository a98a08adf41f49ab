"""What a model costs (`trainables.latency`): its parameters and its latency for one face, and the fallback."""
from __future__ import annotations

import pytest
import torch

import trainables.latency as latency
from trainables.models import build_model


def test_latency_of_a_convnet_in_onnx_runtime_leaves_the_model_as_it_was():
    model = build_model("convnet", num_classes=7, width=16, depth=2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cost = latency.measure_latency(model, repeats=5)
    assert cost["params"] == sum(p.numel() for p in model.parameters()) > 1000
    assert cost["latency_runtime"] == "onnxruntime" and 0 < cost["latency_ms"] < 1000
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # a bigger model of the same family is slower and larger
    big = latency.measure_latency(build_model("convnet", num_classes=7, width=64, depth=3), repeats=5)
    assert big["params"] > cost["params"] and big["latency_ms"] > cost["latency_ms"]


def test_a_model_onnx_cannot_take_is_timed_in_pytorch_and_says_so(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(latency, "_onnx_latency", refuse)
    cost = latency.measure_latency(build_model("convnet", num_classes=7, width=8, depth=2), repeats=3)
    assert cost["latency_runtime"] == "pytorch" and cost["latency_ms"] > 0
    assert torch.get_num_threads() >= 1  # the thread count is restored


def test_median_is_robust_to_one_slow_call():
    calls = iter([0.0] * latency.WARMUP + [0.001, 0.001, 0.5, 0.001, 0.001])
    import time

    def call():
        time.sleep(next(calls))

    assert latency._median_ms(call, 5) == pytest.approx(1.0, abs=2.0)

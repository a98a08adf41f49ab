"""What a model costs a user: its parameters and its latency for one face, at batch 1 on one thread.

Each trial measures its built model before training (`trainables.tune_trainable`), so that
trials.csv says how fast every configuration is, beside how accurate. The latency is measured
where the shipped model runs, ONNX Runtime on the CPU: the model is exported with torch's
TorchScript-based exporter (`dynamo=False`, about a second for a ConvNet, where the dynamo
exporter that `search.serving.deploy` uses for the shipped files takes several) and timed in a
one-thread session; where the export fails, PyTorch eager on one thread, and `latency_runtime`
says so. A crop's own preprocessing (scaling, the softmax) is left out: it is the same for
every model. Nothing here imports Ray.
"""
from __future__ import annotations

import copy
import io
import statistics
import time
import warnings

import torch
import torch.nn as nn

RUNTIMES = ("onnxruntime", "pytorch")
WARMUP, REPEATS = 5, 30  # timed calls after a warm-up; the median is kept (robust to a busy neighbour)


def count_parameters(model: nn.Module) -> int:
    """Every parameter of `model` (trainable or frozen): what the shipped file holds."""
    return sum(p.numel() for p in model.parameters())


def _median_ms(call, repeats: int) -> float:
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _onnx_latency(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():  # the exporter's deprecation notices, once per trial otherwise
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"], output_names=["logits"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return _median_ms(lambda: session.run(None, feed), repeats)


def _torch_latency(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return _median_ms(lambda: model(x), repeats)
    finally:
        torch.set_num_threads(threads)


def measure_latency(model: nn.Module, *, size: int = 48, repeats: int = REPEATS) -> dict:
    """`params`, `latency_ms` (one 48x48 face, batch 1, one CPU thread; the median of `repeats` calls) and
    `latency_runtime` ("onnxruntime", or "pytorch" where the export or ONNX Runtime failed) of `model`.

    Measured on a CPU copy in eval mode; `model` itself is left as it was.
    """
    probe = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    x = torch.zeros(1, 1, size, size)
    out = {"params": count_parameters(probe)}
    try:
        out.update(latency_ms=_onnx_latency(probe, x, repeats), latency_runtime="onnxruntime")
    except Exception:  # an operator the exporter or ONNX Runtime lacks: time it in PyTorch, and say so
        out.update(latency_ms=_torch_latency(probe, x, repeats), latency_runtime="pytorch")
    return out

"""How much memory a trial needs, computed before it starts, so that Ray can place it where it fits.

The model is built on PyTorch's `meta` device (shapes only: no memory, no compute, under a
second even for DenseNet-169) and one sample is run through it to add up the tensors a forward
pass creates (see `layer_outputs`). Training memory is then

    fixed  +  parameter bytes x (weights + gradients + optimizer state [+ EMA])  +  batch x activation bytes x k

with `fixed` (the worker process, the data set and PyTorch's own buffers) and `k` (the share
of layer outputs autograd keeps for the backward pass, plus the allocator's slack) fitted to
peak resident memory measured on CPU by `benchmarks/memory_estimate.py`; the README gives
the measured error. On CUDA activations are bf16 (half the bytes) and the fixed part is the
CUDA context.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from trainables.config import TrialConfig
from trainables.device import fast_training
from trainables.models import forward_with_hooks
from trainables.runner import model_from_config

GIB = 2**30
# Fitted to 19 measured CPU peaks (benchmarks/memory_estimate.py on 2 cores; least squares on the
# relative error: fixed 1.12 GiB, factor 1.07), rounded up to 1.2 GiB and 1.15 so that the
# estimate errs towards running fewer trials at once; the README gives the error per
# configuration. The CUDA figures are not fitted (no GPU was measured): the same factor on bf16
# activations, and the CUDA context left to the fraction's headroom.
FIXED_BYTES = {"cpu": int(1.2 * GIB), "cuda": int(0.6 * GIB)}
ACTIVATION_FACTOR = {"cpu": 1.15, "cuda": 1.15}
# bf16 autocast (CUDA, and CPUs with native bf16) keeps activations in 2 bytes, fp32 in 4.
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2}
OPTIMIZER_STATES = {"sgd": 1, "adam": 2, "adamw": 2}  # momentum; Adam's two moments


def layer_outputs(model: nn.Module) -> int:
    """Elements of the tensors one 48x48 face creates in a forward pass (meta device: no compute).

    Every leaf layer's output, except an in-place layer's (a ReLU that writes over its input),
    and every tensor a leaf layer receives that no layer produced: what functional code between
    layers made, such as DenseNet's concatenation of all earlier features in each dense layer or
    the upsampling to the config's input size.
    """
    total = 0
    x = torch.empty(1, 1, 48, 48, device="meta")
    produced = {id(x)}
    kept = []  # the tensors themselves, so that no id is reused while the pass runs

    def count(module, inputs, output) -> None:
        nonlocal total
        for t in inputs:
            if isinstance(t, torch.Tensor) and id(t) not in produced:
                total += t.numel()
                produced.add(id(t))
                kept.append(t)
        if isinstance(output, torch.Tensor) and id(output) not in produced:
            if not getattr(module, "inplace", False):
                total += output.numel()
            produced.add(id(output))
            kept.append(output)

    model.eval()  # a batch of one: BatchNorm must not need batch statistics
    forward_with_hooks(model, x, [m for m in model.modules() if not list(m.children())], count)
    return total


def estimate_memory(config: TrialConfig | Mapping[str, Any], num_classes: int = 7, *,
                    device: str = "cpu") -> dict[str, float]:
    """Bytes a trial of `config` needs to train on `device` ("cpu" or "cuda"), and what they are made of."""
    cfg = TrialConfig.of(config)
    with torch.device("meta"):
        model = model_from_config(cfg, num_classes, load_imagenet=False)
    params = sum(p.numel() for p in model.parameters())
    outputs = layer_outputs(model)
    # weights, gradients, optimizer state, and the averaged copy of the weights with EMA
    states = 2 + OPTIMIZER_STATES.get(cfg.optimizer, 2) + (1 if cfg.ema_fraction else 0)
    parameter_bytes = 4 * params * states
    precision = "bf16" if fast_training(torch.device(device)) else "fp32"
    activation_bytes = cfg.batch_size * outputs * ACTIVATION_BYTES[precision] * ACTIVATION_FACTOR[device]
    total = FIXED_BYTES[device] + parameter_bytes + activation_bytes
    return {"bytes": float(total), "params": float(params), "outputs_per_image": float(outputs),
            "parameter_bytes": float(parameter_bytes), "activation_bytes": float(activation_bytes)}


class TrialDoesNotFit(RuntimeError):
    """A trial whose estimated memory exceeds what the largest node offers; it fails before training."""


def check_fits(config: TrialConfig | Mapping[str, Any], limit_bytes: float | None, *, num_classes: int = 7,
               device: str = "cpu") -> None:
    """Raise `TrialDoesNotFit` with a one-line reason when `config` needs more than `limit_bytes`."""
    if not limit_bytes:
        return
    need = estimate_memory(config, num_classes, device=device)["bytes"]
    if need > limit_bytes:
        where = "GPU memory" if device == "cuda" else "memory for trials"
        raise TrialDoesNotFit(f"needs {need / GIB:.1f} GiB (estimated), the largest node has "
                              f"{limit_bytes / GIB:.1f} GiB of {where}")


# One training step of `config` on random faces, in a fresh process, printing its peak memory.
PROBE = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from trainables.data import FERData, Split
from trainables.runner import build_run
from trainables.train import train_one_epoch
cfg, device = json.loads(sys.argv[1]), torch.device(sys.argv[2])
n = 2 * cfg["batch_size"]
g = torch.Generator().manual_seed(0)
split = lambda m: Split(torch.randint(0, 256, (m, 48, 48), dtype=torch.uint8, generator=g),
                        torch.arange(m) % 7, torch.arange(m))
data = FERData(tuple("abcdefg"), {"Training": split(n), "PublicTest": split(7)}, "probe")
run = build_run(cfg, data, epochs=1, device=device)
train_one_epoch(run.model, run.optimizer, run.schedule, run.train, batch_size=cfg["batch_size"],
                augment=run.augment, device=device, generator=run.generator)
if device.type == "cuda":
    print(json.dumps({"peak": torch.cuda.max_memory_allocated()}))
else:
    # VmHWM, this process's own peak: ru_maxrss also carries the parent's peak across fork and exec
    # (Linux keeps it in the signal struct), so a probe started by a 3 GiB process would read 3 GiB.
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):  # not Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak}))
"""


def measure_peak(config: Mapping[str, Any], device: str = "cpu") -> float:
    """Peak memory (bytes) of two training steps of `config` in a fresh process: resident memory on
    CPU (the process's own VmHWM), allocated CUDA memory on a GPU. What the estimate is checked against."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(dict(config)), device], cwd=root,
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak"])

"""Throughput benchmark: our training step vs a bare PyTorch loop, batched vs per-image PIL augmentation.

`python benchmarks/throughput.py [--data PATH|demo] [--images N]` measures, in one
run and on the same machine, (a) training images/s of `train_one_epoch` (the
trainable's step: uint8 batches sliced from memory, augmented on the device) against
a bare loop over pre-made float tensors with the same model, optimizer and batch
size, and (b) the batched augmentation against a torchvision per-image PIL pipeline
of the same policy. It prints the ratios and writes them to
`results/benchmarks/throughput.csv`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from augment_bench import bench_augment  # noqa: E402

from trainables.augment import build_augment, normalize, to_input  # noqa: E402
from trainables.data import load_fer2013, stratified_fraction  # noqa: E402
from trainables.device import CPU_BF16_ENV, autocast, fast_training, pick_device, to_device  # noqa: E402
from trainables.files import write_csv  # noqa: E402
from trainables.models import build_model  # noqa: E402
from trainables.optim import Schedule, build_optimizer  # noqa: E402
from trainables.train import train_one_epoch  # noqa: E402


def bare_loop(model, x: torch.Tensor, y: torch.Tensor, batch: int, device) -> float:
    """Images/s of the plainest loop: float tensors ready in memory, no augmentation, no schedule
    (in the same precision and memory format as our step, so that only the loop differs)."""
    opt = build_optimizer("sgd", model.parameters(), lr=0.01)
    model.train()
    if fast_training(device):
        x = x.contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        with autocast(device):
            loss = F.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - start)


def ours(model, split, batch: int, device, policy: str) -> float:
    """Images/s of `train_one_epoch` with augmentation `policy`."""
    opt = build_optimizer("sgd", model.parameters(), lr=0.01)
    sched = Schedule(opt, "cosine", epochs=1, steps_per_epoch=max(1, len(split) // batch))
    return train_one_epoch(model, opt, sched, split, batch_size=batch, augment=build_augment(policy),
                           device=device)["images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="demo", help="fer2013.csv, image folder or 'demo' (default demo)")
    p.add_argument("--images", type=int, default=2048, help="images per measurement (default 2048)")
    p.add_argument("--batch", type=int, default=64, help="training batch size (default 64)")
    p.add_argument("--arch", default="convnet", help="model for (a) (default convnet)")
    p.add_argument("--out", default="results/benchmarks/throughput.csv", help="output CSV")
    a = p.parse_args()
    torch.manual_seed(0)
    device = pick_device()
    data = load_fer2013(a.data, splits=("Training",))
    train = data.train
    if len(train) > a.images:
        train = stratified_fraction(train, a.images / len(train), seed=0)
    split = to_device(train, data.num_classes, device)
    model = build_model(a.arch, num_classes=data.num_classes).to(device)
    if fast_training(device):
        model = model.to(memory_format=torch.channels_last)
    precision = "bf16 autocast, channels-last" if fast_training(device) else "fp32"
    x = normalize(to_input(split.x)).contiguous()
    rows = []
    ours(model, split, a.batch, device, "none")  # warm-up: allocator, kernels
    base = bare_loop(model, x, split.y, a.batch, device)
    for policy in ("none", "flip_crop", "strong"):
        ips = ours(model, split, a.batch, device, policy)
        rows.append({"measure": f"train step ({a.arch}, augment={policy}, {precision}) vs bare loop",
                     "ours_per_s": ips, "baseline_per_s": base, "ratio": ips / base})
    if device.type == "cpu" and fast_training(device):
        # The same step in fp32, contiguous: what a CPU without native bf16 (or FER_CPU_BF16=off) runs.
        fast = rows[1]["ours_per_s"]
        os.environ[CPU_BF16_ENV] = "off"
        try:
            plain = build_model(a.arch, num_classes=data.num_classes).to(device)
            ours(plain, split, a.batch, device, "none")
            fp32 = ours(plain, split, a.batch, device, "flip_crop")
        finally:
            del os.environ[CPU_BF16_ENV]
        rows.append({"measure": f"train step ({a.arch}, augment=flip_crop): bf16 + channels-last vs fp32 on this "
                                f"CPU", "ours_per_s": fast, "baseline_per_s": fp32, "ratio": fast / fp32})
    for policy in ("flip_crop", "strong"):
        aug = bench_augment(policy=policy, n=a.images, batch=256, images=train.x)
        rows.append({"measure": f"augmentation {policy}: batched vs per-image PIL",
                     "ours_per_s": aug["batched_per_s"], "baseline_per_s": aug["pil_per_s"],
                     "ratio": aug["ratio"]})
    df = pd.DataFrame(rows)
    df.insert(0, "device", str(device))
    df.insert(1, "threads", torch.get_num_threads())
    write_csv(df, a.out)
    print(df.to_string(index=False, float_format=lambda v: f"{v:,.2f}"))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

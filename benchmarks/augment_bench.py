"""Batched on-device augmentation vs torchvision's per-image PIL pipeline, same policy, same images.

Both sides start from uint8 faces and end with a normalised float batch, so the ratio is the
speed-up the training loop sees. Run: `python -m benchmarks.augment_bench --policy strong`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from trainables.augment import build_augment, normalize, to_input
from trainables.errors import UserError

BENCH_POLICIES = ("none", "flip_crop", "strong", "randaugment", "trivialaugment")


def pil_pipeline(policy: str, magnitude: float = 0.5) -> T.Compose:
    """torchvision's per-image PIL equivalent of batched `policy` (same ranges as trainables.augment)."""
    m = magnitude
    flip_crop = [T.RandomHorizontalFlip(), T.RandomCrop(48, padding=4, padding_mode="reflect")]
    stages = {
        "none": [T.ToTensor()],
        "flip_crop": flip_crop + [T.ToTensor()],
        "strong": flip_crop + [
            T.RandomAffine(degrees=30.0 * m, scale=(1.0 - 0.4 * m, 1.0 + 0.4 * m),
                           interpolation=T.InterpolationMode.BILINEAR),
            T.ColorJitter(brightness=0.8 * m, contrast=0.8 * m),
            T.ToTensor(),
            T.RandomErasing(p=m, scale=(0.02, 0.2), ratio=(0.3, 3.3)),
        ],
        "randaugment": flip_crop + [T.RandAugment(num_ops=2, magnitude=round(30 * m)), T.ToTensor()],
        "trivialaugment": flip_crop + [T.TrivialAugmentWide(), T.ToTensor()],
    }
    if policy not in stages:
        raise UserError(f"no PIL baseline for policy {policy!r}; choose from {list(BENCH_POLICIES)}")
    return T.Compose(stages[policy])


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_batched(policy: str, images: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    """Seconds for the batched policy to turn all `images` into normalised augmented batches."""
    aug = build_augment(policy)
    aug(to_input(images[:batch]), labels[:batch])  # warm-up: kernel selection, first allocations
    _sync(images.device)
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        x, _ = aug(to_input(images[i:i + batch]), labels[i:i + batch])
        normalize(x)
    _sync(images.device)
    return time.perf_counter() - start


def _time_pil(policy: str, images: torch.Tensor, batch: int) -> float:
    """Seconds for the per-image PIL pipeline to do the same, collating batches as a DataLoader would."""
    pipeline = pil_pipeline(policy)
    arrays = images.cpu().numpy()
    pipeline(Image.fromarray(arrays[0]))  # warm-up
    start = time.perf_counter()
    for i in range(0, len(arrays), batch):
        x = torch.stack([pipeline(Image.fromarray(a)) for a in arrays[i:i + batch]])
        normalize(x)
    return time.perf_counter() - start


def bench_augment(policy: str = "strong", n: int = 2048, batch: int = 256, *, images: torch.Tensor | None = None,
                  device: str | torch.device = "cpu", threads: int | None = None, seed: int = 0) -> dict:
    """Time batched `policy` against its PIL pipeline on the same n faces; return img/s and the ratio.

    `images` is an (N, 48, 48) uint8 tensor (e.g. real FER2013 faces); random pixels otherwise.
    The batched side runs on `device`, the PIL side on the CPU, one image at a time as in a
    DataLoader worker. `threads` sets torch's CPU threads for the run (None: leave as is; 1
    gives a per-core comparison). Returns policy, n, batch, device, threads, batched_per_s,
    pil_per_s and ratio (batched speed / PIL speed).
    """
    torch.manual_seed(seed)
    if images is None:
        images = torch.randint(0, 256, (n, 48, 48), dtype=torch.uint8)
    device = torch.device(device)
    images = images[:n].contiguous().to(device)
    labels = F.one_hot(torch.randint(0, 7, (len(images),)), 7).float().to(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        batched_s = _time_batched(policy, images, labels, batch)
        pil_s = _time_pil(policy, images, batch)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    count = len(images)
    return {"policy": policy, "n": count, "batch": batch, "device": str(device), "threads": used,
            "batched_per_s": count / batched_s, "pil_per_s": count / pil_s, "ratio": pil_s / batched_s}


def _load_npz(path: str) -> torch.Tensor:
    """The `pixels` array of a fer2013.npz as a uint8 tensor."""
    return torch.from_numpy(np.load(path)["pixels"])


def main() -> None:
    """Print the comparison for one policy or all of them."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policy", default="all", help=f"one of {list(BENCH_POLICIES)}, or 'all'")
    parser.add_argument("--n", type=int, default=2048, help="images to augment per side")
    parser.add_argument("--batch", type=int, default=256, help="batch size of the batched policy")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: per-core comparison)")
    parser.add_argument("--device", default="cpu", help="device for the batched side, e.g. cuda (default cpu)")
    parser.add_argument("--npz", default=None, help="fer2013.npz to take real faces from (default: random pixels)")
    args = parser.parse_args()
    images = _load_npz(args.npz) if args.npz else None
    policies = BENCH_POLICIES if args.policy == "all" else (args.policy,)
    print(f"{'policy':15s} {'batched img/s':>14s} {'PIL img/s':>10s} {'ratio':>7s}")
    for policy in policies:
        r = bench_augment(policy, args.n, args.batch, images=images, device=args.device, threads=args.threads)
        print(f"{policy:15s} {r['batched_per_s']:14,.0f} {r['pil_per_s']:10,.0f} {r['ratio']:6.1f}x")


if __name__ == "__main__":
    main()

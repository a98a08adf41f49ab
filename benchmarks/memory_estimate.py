"""Estimated against measured training memory, per (architecture, stem, batch size), on this machine.

Each configuration trains two steps in a fresh process (so that one probe's memory never
inflates the next) and reports its peak resident memory (its own VmHWM); the estimate is
`trainables.memory.estimate_memory`. Writes `results/benchmarks/memory_estimate.csv` with
both figures and their ratio, and prints the table. On CUDA (`--device cuda`) it measures
`torch.cuda.max_memory_allocated` plus the fixed CUDA context instead.

    python benchmarks/memory_estimate.py              # the README's grid (a few minutes on 2 cores)
    python benchmarks/memory_estimate.py --quick      # four small configurations
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from trainables.files import write_csv  # noqa: E402
from trainables.memory import GIB, estimate_memory, measure_peak  # noqa: E402

GRID = [("convnet", "stride", b) for b in (64, 256)] + [
    (arch, stem, b) for arch in ("resnet18", "resnet50", "densenet121") for stem in ("stride", "keep", "imagenet")
    for b in (64, 256)]
QUICK = [("convnet", "stride", 256), ("resnet18", "stride", 64), ("resnet18", "keep", 64),
         ("densenet121", "stride", 64)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default cpu)")
    p.add_argument("--quick", action="store_true", help="four small configurations instead of the grid")
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "memory_estimate.csv"),
                   help="CSV to write (default results/benchmarks/memory_estimate.csv)")
    a = p.parse_args()
    rows = []
    for arch, stem, batch in QUICK if a.quick else GRID:
        config = {"arch": arch, "stem": stem, "batch_size": batch, "optimizer": "sgd", "augment": "flip_crop"}
        est = estimate_memory(config, device=a.device)["bytes"]
        try:
            peak = measure_peak(config, a.device)
        except subprocess.CalledProcessError:  # the kernel's OOM killer: it did not fit this machine
            peak = math.nan
        rows.append({"arch": arch, "stem": stem, "batch_size": batch, "device": a.device,
                     "estimated_gib": est / GIB, "measured_gib": peak / GIB, "ratio": est / peak})
        print(f"{arch:12s} {stem:8s} {batch:4d}  estimated {est / GIB:6.2f} GiB  measured {peak / GIB:6.2f} GiB  "
              f"ratio {est / peak:5.2f}", flush=True)
    df = pd.DataFrame(rows)
    write_csv(df, a.out)
    print(f"wrote {a.out}; ratio estimated/measured: min {df['ratio'].min():.2f}, max {df['ratio'].max():.2f}")


if __name__ == "__main__":
    main()

"""`python -m search.augment_preview --policy strong`: see what an augmentation policy does.

Draws a few Training images and writes a PNG grid: the original in the first
column, then independent draws of the policy (each column a new batch call, so
every cell shows different per-sample random parameters).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from search.tuning.cli import Parser, run_cli
from trainables.augment import POLICIES, build_augment, to_input
from trainables.data import load_fer2013
from trainables.errors import UserError


def build_parser() -> Parser:
    p = Parser(prog="python -m search.augment_preview", description="Write a PNG grid of augmented FER images.")
    p.add_argument("--policy", required=True, help=f"augmentation policy: one of {sorted(POLICIES)}")
    p.add_argument("--magnitude", type=float, default=0.5, help="policy strength in [0, 1] (default 0.5)")
    p.add_argument("--mix-alpha", type=float, default=1.0, help="Beta(alpha, alpha) of mixup/cutmix (default 1)")
    p.add_argument("--data", default=os.environ.get("FER2013_PATH", "data/fer2013.csv"),
                   help="fer2013.csv, a Kaggle image folder, or 'demo' (default $FER2013_PATH, else data/fer2013.csv)")
    p.add_argument("--images", type=int, default=8, help="rows: how many images (default 8)")
    p.add_argument("--draws", type=int, default=7, help="columns of augmented draws (default 7)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--out", default="", help="PNG path (default results/augment_preview/<policy>.png)")
    return p


def render_grid(images: list[torch.Tensor], titles: list[str], path: Path) -> None:
    """Columns of (N,1,H,W) image batches in [0, 1] as one grayscale PNG grid."""
    rows, cols = images[0].shape[0], len(images)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows), squeeze=False)
    for c, batch in enumerate(images):
        for r in range(rows):
            ax = axes[r][c]
            ax.imshow(batch[r, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[0][c].set_title(titles[c], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.images < 1 or a.draws < 1:
        raise UserError("--images and --draws must be positive")
    if not 0 <= a.magnitude <= 1:
        raise UserError(f"--magnitude must be in [0, 1], got {a.magnitude}")
    data = load_fer2013(a.data, splits=("Training",), seed=a.seed)
    policy = build_augment(a.policy, magnitude=a.magnitude, mix_alpha=a.mix_alpha, num_classes=data.num_classes)
    g = torch.Generator().manual_seed(a.seed)
    idx = torch.randperm(len(data.train), generator=g)[: a.images]
    x = to_input(data.train.x[idx])
    target = torch.nn.functional.one_hot(data.train.y[idx], data.num_classes).float()
    torch.manual_seed(a.seed)
    columns, titles = [x], ["original"]
    for d in range(a.draws):
        columns.append(policy(x.clone(), target.clone())[0])
        titles.append(f"draw {d + 1}")
    out = Path(a.out or f"results/augment_preview/{a.policy}.png")
    render_grid(columns, titles, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

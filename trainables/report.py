"""Pictures of the final evaluation: confusion matrices and a grid of the worst mistakes.

Figures are built on `matplotlib.figure.Figure` directly (the Agg canvas), never
through `pyplot`, so nothing here changes a global backend or leaks open figures
in a long-running driver. Every PNG is written atomically.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from trainables.files import atomic_path
from trainables.metrics import normalize_rows


def _save(fig: Figure, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_confusion(confusions: Mapping[str, np.ndarray], class_names: Sequence[str],
                   path: str | os.PathLike, *, title: str = "") -> None:
    """One panel per entry of `confusions` (e.g. per TTA mode): colour = row share, text = share and count."""
    n = len(class_names)
    side = 1.0 + 0.62 * n
    fig = Figure(figsize=(side * len(confusions), side + 0.6), layout="constrained")
    axes = fig.subplots(1, len(confusions), squeeze=False)[0]
    for ax, (label, cm) in zip(axes, confusions.items()):
        share = normalize_rows(cm)
        ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{share[i, j]:.0%}\n{cm[i, j]}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.55 else "black")
        ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        acc = np.trace(cm) / max(cm.sum(), 1)
        ax.set_title(f"{label}: accuracy {acc:.1%}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_mistakes(images: np.ndarray, captions: Sequence[str], path: str | os.PathLike, *,
                  title: str = "", columns: int = 6) -> None:
    """A grid of grayscale images (N, H, W uint8), each with its caption (e.g. row, true, predicted, confidence)."""
    n = max(len(images), 1)
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(1.75 * columns, 2.05 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k], cmap="gray", vmin=0, vmax=255)
            ax.set_title(captions[k], fontsize=7)
    if not len(images):
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)

"""Pictures of the final evaluation: confusion matrices, the worst mistakes, kernels and activations.

Figures are built on `matplotlib.figure.Figure` directly (the Agg canvas), never
through `pyplot`, so nothing here changes a global backend or leaks open figures
in a long-running driver. Every PNG is written atomically.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from trainables.files import atomic_path
from trainables.metrics import normalize_rows

if TYPE_CHECKING:
    import torch


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write `fig` as a PNG at `path` atomically (a reader never sees half a file): every figure goes through here."""
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
    save_figure(fig, path)


_GAP, _BAND = 4, 9  # pixels between tiles, and above each tile for its caption (two lines at 7 pt)
_INCH_PER_PX = 1.5 / 48  # a 48x48 face is 1.5 inches wide


def _plot_tiles(tiles: np.ndarray, captions: Sequence[str], path: str | os.PathLike, *, columns: int,
                title: str = "", row_labels: Sequence[str] = ()) -> None:
    """RGB tiles (N, H, W, 3 floats in [0, 1]) in a grid with a caption above each, drawn as one image.

    One image with text on it rather than one Axes per tile: matplotlib lays out and draws
    each Axes separately: a 48-face grid took 1.7 s to save that way, 0.4 s this way (measured side by side).
    """
    n, h, w = tiles.shape[:3]
    rows = max(1, math.ceil(n / columns))
    cell_h, cell_w = h + _BAND + _GAP, w + _GAP
    canvas = np.ones((rows * cell_h, columns * cell_w, 3))
    for k in range(n):
        r, c = divmod(k, columns)
        canvas[r * cell_h + _BAND:r * cell_h + _BAND + h, c * cell_w:c * cell_w + w] = tiles[k]
    left = 0.3 if row_labels else 0.0
    fig = Figure(figsize=(canvas.shape[1] * _INCH_PER_PX + left, canvas.shape[0] * _INCH_PER_PX + 0.4))
    ax = fig.add_axes((left / fig.get_figwidth(), 0, 1 - left / fig.get_figwidth(), 1 - 0.4 / fig.get_figheight()))
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    for k, caption in enumerate(captions[:n]):
        r, c = divmod(k, columns)
        ax.text(c * cell_w + w / 2, r * cell_h + _BAND - 1, caption, ha="center", va="bottom", fontsize=7,
                linespacing=1.0)
    for r, label in enumerate(row_labels[:rows]):
        ax.text(-3, r * cell_h + _BAND + h / 2, label, ha="right", va="center", rotation=90, fontsize=9)
    if not n:
        ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=9, y=1 - 0.1 / fig.get_figheight(), va="top")
    save_figure(fig, path)


def _gray(images: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(images, dtype=np.float64)[..., None] / 255.0, 3, axis=-1)


def plot_mistakes(images: np.ndarray, captions: Sequence[str], path: str | os.PathLike, *,
                  title: str = "", columns: int = 6) -> None:
    """A grid of grayscale images (N, H, W uint8), each with its caption (e.g. row, true, predicted, confidence)."""
    if not len(images):
        images, captions = np.zeros((0, 48, 48), dtype=np.uint8), []
    _plot_tiles(_gray(images), captions, path, columns=min(columns, max(len(images), 1)),
                title=title or ("no mistakes" if not len(images) else ""))


def plot_vote_mistakes(images: np.ndarray, counts: np.ndarray, labels: Sequence[int], predicted: Sequence[int],
                       confidence: Sequence[float], rows: Sequence[int], class_names: Sequence[str],
                       path: str | os.PathLike, *, title: str = "", columns: int = 3) -> None:
    """Mistakes beside their FER+ votes: each face (N, H, W uint8), then a bar per emotion with its vote count
    (`counts` (N, C + 1): the C emotions, then the votes for none of them), the FER2013 label's bar blue, the
    model's prediction orange."""
    n = len(images)
    grid = max(1, math.ceil(n / columns))
    fig = Figure(figsize=(3.6 * min(columns, max(n, 1)), 1.55 * grid + 0.5), layout="constrained")
    cells = fig.subfigures(grid, min(columns, max(n, 1)), squeeze=False)
    names = [*class_names, "other"]
    for k, cell in enumerate(cells.flat):
        if k >= n:
            continue
        face, bars = cell.subplots(1, 2, width_ratios=[1, 1.6])
        face.imshow(images[k], cmap="gray", vmin=0, vmax=255)
        face.axis("off")
        colour = ["#bbbbbb"] * len(names)
        colour[int(labels[k])], colour[int(predicted[k])] = "#1f77b4", "#ff7f0e"
        bars.barh(range(len(names)), counts[k], color=colour)
        bars.set_yticks(range(len(names)), names, fontsize=6)
        for i, tick in enumerate(bars.get_yticklabels()):  # named in colour even where the bar has no vote
            if colour[i] != "#bbbbbb":
                tick.set_color(colour[i])
                tick.set_fontweight("bold")
        bars.invert_yaxis()
        bars.tick_params(axis="x", labelsize=6)
        bars.set_xlim(0, max(10, int(np.max(counts[k])) if len(counts[k]) else 10))
        cell.suptitle(f"row {rows[k]}: label {class_names[int(labels[k])]}, model {class_names[int(predicted[k])]} "
                      f"{confidence[k]:.0%}", fontsize=7)
    fig.suptitle((title or "mistakes and their FER+ votes") + ("" if n else ": no mistakes")
                 + "\nblue: the FER2013 label, orange: the model's prediction; bars: FER+ annotators' votes",
                 fontsize=8)
    save_figure(fig, path)


# --------------------------------------------------------------------------- what the network learned

def plot_kernels(model: "torch.nn.Module", path: str | os.PathLike, *, title: str = "", most: int = 64) -> None:
    """The first convolution's kernels (the model sees one gray channel), each a tile; red +, blue -."""
    import torch.nn as nn

    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    w = conv.weight.detach().float().cpu().numpy()[:most, 0]
    columns = min(8, len(w))
    rows = math.ceil(len(w) / columns)
    fig = Figure(figsize=(1.0 * columns, 1.0 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(w):
            lim = float(np.abs(w[k]).max()) or 1.0
            ax.imshow(w[k], cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.suptitle(title or f"first-layer kernels ({conv.kernel_size[0]}x{conv.kernel_size[1]})", fontsize=9)
    save_figure(fig, path)


def emotion_activations(model: "torch.nn.Module", x_uint8: "torch.Tensor", y: "torch.Tensor", num_classes: int,
                        *, per_class: int = 200, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per emotion: the mean face and the mean activation map (channel-mean |activation| of the deepest
    conv that keeps a spatial grid, `explain.explained_layer`, upsampled to 48x48), over up to
    `per_class` images of that emotion."""
    import torch
    import torch.nn.functional as F

    from search.figures.explain import explained_layer
    from trainables.augment import normalize, to_input

    model.eval()
    device = next(model.parameters()).device
    layer = explained_layer(model, x_uint8)
    faces = np.zeros((num_classes, *x_uint8.shape[-2:]), dtype=np.float32)
    maps = np.zeros_like(faces)
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()[:per_class]
        if not len(idx):
            continue
        faces[c] = x_uint8[idx].float().mean(0).numpy()
        total = torch.zeros(x_uint8.shape[-2:])
        for i in range(0, len(idx), batch):
            grabbed = []
            hook = layer.register_forward_hook(lambda mod, _, out: grabbed.append(out.detach()))
            try:
                with torch.no_grad():
                    model(normalize(to_input(x_uint8[idx[i:i + batch]].to(device))))
            finally:
                hook.remove()
            act = grabbed[0].float().abs().mean(1, keepdim=True)
            total += F.interpolate(act, size=x_uint8.shape[-2:], mode="bilinear").sum(0)[0].cpu()
        maps[c] = (total / len(idx)).numpy()
    return faces, maps


def plot_activations(faces: np.ndarray, maps: np.ndarray, class_names: Sequence[str],
                     path: str | os.PathLike, *, title: str = "") -> None:
    """Per emotion: its mean face, and where the network fires on it more (red) or less (blue) than
    on the average emotion. The difference is shown because the raw maps are dominated by what
    every face shares (eyes, mouth, the face outline)."""
    n = len(class_names)
    fig = Figure(figsize=(1.6 * n, 3.6), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    diff = maps - maps.mean(0, keepdims=True)
    lim = float(np.abs(diff).max()) or 1.0
    for c, name in enumerate(class_names):
        axes[0, c].imshow(faces[c], cmap="gray", vmin=0, vmax=255)
        axes[0, c].set_title(name, fontsize=8)
        axes[1, c].imshow(faces[c], cmap="gray", vmin=0, vmax=255)
        axes[1, c].imshow(diff[c], cmap="RdBu_r", alpha=0.65, vmin=-lim, vmax=lim)
        for ax in axes[:, c]:
            ax.axis("off")
    fig.suptitle(title or "mean face, and activation relative to the average emotion", fontsize=9)
    save_figure(fig, path)


# --------------------------------------------------------------------------- where it looks, how it arranges faces

def overlay(images: np.ndarray, maps: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """Gray faces (N, H, W uint8) with heat maps (N, H, W in [0, 1]) over them in the jet colours: (N, H, W, 3)."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(maps, 0.0, 1.0))[..., :3]
    return (1 - alpha) * _gray(images) + alpha * heat


def plot_gradcam_grid(images: np.ndarray, maps: np.ndarray, captions: Sequence[str], row_labels: Sequence[str],
                      columns: int, path: str | os.PathLike, *, title: str = "") -> None:
    """Rows of faces (N, H, W uint8) with their Grad-CAM (N, H, W in [0, 1]) over them; an empty caption
    leaves its cell blank (an emotion with fewer examples than columns)."""
    tiles = overlay(images, maps)
    tiles[[not c for c in captions]] = 1.0
    _plot_tiles(tiles, captions, path, columns=columns, title=title, row_labels=row_labels)


def plot_mean_gradcam(faces: np.ndarray, maps: np.ndarray, counts: Sequence[int], class_names: Sequence[str],
                      path: str | os.PathLike, *, title: str = "") -> None:
    """Per emotion: the mean face of the images averaged, and their mean Grad-CAM over it."""
    n = len(class_names)
    fig = Figure(figsize=(1.6 * n, 2.2), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for c, ax in enumerate(axes):
        ax.axis("off")
        ax.imshow(faces[c], cmap="gray", vmin=0, vmax=255)
        if counts[c]:  # each emotion on its own scale: the figure says where, not how strongly
            ax.imshow(maps[c], cmap="jet", alpha=0.45, vmin=0.0, vmax=float(maps[c].max()) or 1.0)
        ax.set_title(f"{class_names[c]} ({counts[c]})", fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def plot_embedding(xy: np.ndarray, y: np.ndarray, class_names: Sequence[str], pairs: Sequence[tuple[int, int]],
                   path: str | os.PathLike, *, title: str = "") -> None:
    """A 2-D embedding coloured by emotion, each emotion's median point labelled, and the given class pairs
    (the most confused) joined by a dashed line between their medians."""
    from matplotlib import colormaps

    colours = colormaps["tab10"]
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    centres = {}
    for c, name in enumerate(class_names):
        pts = xy[y == c]
        if not len(pts):
            continue
        ax.scatter(pts[:, 0], pts[:, 1], s=5, alpha=0.55, color=colours(c % 10), label=f"{name} ({len(pts)})")
        centres[c] = np.median(pts, axis=0)
    for rank, (i, j) in enumerate(pairs, start=1):
        if i in centres and j in centres:
            (x0, y0), (x1, y1) = centres[i], centres[j]
            ax.plot([x0, x1], [y0, y1], "k--", linewidth=1.2)
            ax.annotate(f"#{rank}", ((x0 + x1) / 2, (y0 + y1) / 2), fontsize=9, fontweight="bold")
    for c, (cx, cy) in centres.items():
        ax.annotate(class_names[c], (cx, cy), fontsize=10, fontweight="bold", ha="center", va="center",
                    bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8,
                          "edgecolor": colours(c % 10)})
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=3, loc="best")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


RELIABLE_BIN = 10


def plot_reliability(curves: Mapping[str, Mapping[str, np.ndarray]], path: str | os.PathLike, *,
                     title: str = "") -> None:
    """Reliability diagram: per confidence bin, accuracy against mean confidence, one line per entry.

    `curves` maps a label (e.g. "before (ECE 8.1%)") to `trainables.calibration.reliability`'s
    dict; a perfectly calibrated model lies on the diagonal. Below, how many images each bin holds;
    a bin of fewer than `RELIABLE_BIN` images is left off the line (its accuracy is noise).
    """
    fig = Figure(figsize=(5.2, 6.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    width = 1.0 / max(len(next(iter(curves.values()))["count"]), 1)
    for i, (label, r) in enumerate(curves.items()):
        used = r["count"] >= RELIABLE_BIN
        top.plot(r["confidence"][used], r["accuracy"][used], marker="o", markersize=4, label=label)
        centres = (r["edges"][:-1] + r["edges"][1:]) / 2
        offset = (i - (len(curves) - 1) / 2) * width / max(len(curves), 1)
        bottom.bar(centres + offset, r["count"], width=width / max(len(curves), 1), label=label)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy in bin")
    top.legend(fontsize=8, loc="upper left")
    bottom.set_xlabel("confidence of the predicted emotion")
    bottom.set_ylabel("images")
    if title:
        top.set_title(title, fontsize=9)
    save_figure(fig, path)


def plot_lr_curve(result: dict, path: str | os.PathLike) -> None:
    """The LR range test's loss-vs-LR curve (`trainables.lr_range.lr_range_test`), the suggestion marked."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(result["lrs"], result["losses"])
    ax.axvline(result["suggested_lr"], color="red", linestyle="--",
               label=f"suggested {result['suggested_lr']:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title="LR range test")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)

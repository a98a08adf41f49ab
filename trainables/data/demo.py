"""The built-in `demo` data: deterministic cartoon faces whose expression shows in mouth and brows."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from trainables.data.splits import EMOTIONS, SEARCH_SPLITS, SIDE, SPLITS, FERData, Split, check_splits
from trainables.errors import UserError

_DEMO_WEIGHTS = np.array([1.0, 0.4, 1.0, 1.0, 1.0, 1.0, 1.0])   # disgust is rare, as in FER2013
# Per class: brow tilt (+: inner ends down), brow raise, eye height, mouth curve (+: smile),
# mouth openness, mouth skew. Neighbouring classes share features, so the task is not trivial.
_DEMO_SHAPES = np.array([
    [0.45, -0.04, 0.06, -0.10, 0.00, 0.00],   # angry: brows slant down to the middle, tight frown
    [0.20, -0.02, 0.05, -0.08, 0.03, 0.30],   # disgust: lowered brows, lopsided sneer
    [-0.35, 0.08, 0.10, -0.06, 0.08, 0.00],   # fear: worried brows, wide eyes, mouth ajar
    [0.00, 0.00, 0.06, 0.30, 0.04, 0.00],     # happy: big smile
    [-0.40, 0.02, 0.05, -0.25, 0.00, 0.00],   # sad: brows up in the middle, frown
    [0.00, 0.14, 0.10, 0.00, 0.16, 0.00],     # surprise: raised brows, round open mouth
    [0.00, 0.00, 0.06, 0.00, 0.00, 0.00],     # neutral: everything flat
])
_DEMO_NOISE = np.array([0.15, 0.04, 0.015, 0.09, 0.03, 0.10])  # per-sample spread of each feature


def make_demo(*, splits: Sequence[str] = SEARCH_SPLITS, n_train: int = 1400, n_val: int = 350,
              n_test: int = 350, seed: int = 0) -> FERData:
    """Generate deterministic cartoon faces (48x48 uint8) whose expression is learnable from shape.

    Brow angle and height, eye size and mouth curve/openness/skew depend on the class, with
    per-sample spread, position/scale/rotation jitter, brightness and noise, so a small
    ConvNet learns it well above chance but not at once. Classes are balanced except disgust
    (0.4x). Each split comes from its own seed stream, so splits hold distinct images and
    one split does not change when another is requested.
    """
    names = check_splits(splits)
    sizes = dict(zip(SPLITS, (n_train, n_val, n_test)))
    streams = dict(zip(SPLITS, np.random.SeedSequence(seed).spawn(len(SPLITS))))
    out = {}
    for name in names:
        if sizes[name] < len(EMOTIONS):
            raise UserError(f"demo split {name} needs at least {len(EMOTIONS)} images, got {sizes[name]}")
        rng = np.random.default_rng(streams[name])
        y = rng.permutation(_demo_labels(sizes[name]))
        x = _draw_faces(y, rng)
        out[name] = Split(torch.from_numpy(x), torch.from_numpy(y), torch.arange(len(y), dtype=torch.int64))
    return FERData(EMOTIONS, out, "demo")


def _demo_labels(n: int) -> np.ndarray:
    """Exact class counts proportional to _DEMO_WEIGHTS (largest remainder), before shuffling."""
    share = n * _DEMO_WEIGHTS / _DEMO_WEIGHTS.sum()
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(counts - share)[: n - counts.sum()]] += 1
    return np.repeat(np.arange(len(EMOTIONS)), counts)


def _soft_mask(dist: np.ndarray, edge: np.ndarray) -> np.ndarray:
    """1 inside (dist < 0), 0 outside, with a one-pixel ramp so shapes are anti-aliased."""
    return np.clip(0.5 - dist / edge, 0.0, 1.0)


def _segment_dist(u: np.ndarray, v: np.ndarray, cx: float, cy: np.ndarray, slope: np.ndarray,
                  half: float) -> np.ndarray:
    """Distance from each (u, v) to the segment centred at (cx, cy) with the given slope."""
    norm = np.sqrt(1 + slope ** 2)
    dx, dy = 1 / norm, slope / norm
    t = np.clip((u - cx) * dx + (v - cy) * dy, -half, half)
    return np.hypot(u - cx - t * dx, v - cy - t * dy)


def _draw_faces(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render one face per label, vectorised over the batch (all shapes are (N, 48, 48))."""
    n = len(y)
    p = _DEMO_SHAPES[y] + rng.normal(size=(n, 6)) * _DEMO_NOISE
    col = lambda a: a.reshape(n, 1, 1).astype(np.float32)   # noqa: E731 - broadcast per sample
    tilt, raise_, eye, curve, opening, skew = (col(p[:, k]) for k in range(6))
    scale, angle = col(rng.uniform(0.8, 1.1, n)), col(rng.uniform(-0.2, 0.2, n))
    grid = (np.arange(SIDE, dtype=np.float32) + 0.5) / SIDE * 2 - 1
    gx, gy = grid[None, None, :], grid[None, :, None]
    sx, sy = gx - col(rng.uniform(-0.12, 0.12, n)), gy - col(rng.uniform(-0.12, 0.12, n))
    u = (np.cos(angle) * sx + np.sin(angle) * sy) / scale
    v = (-np.sin(angle) * sx + np.cos(angle) * sy) / scale
    edge = (2.0 / SIDE) / scale
    face = _soft_mask(np.hypot(u / 0.78, v / 0.95) - 1, edge / 0.8)
    ink = np.zeros_like(u)
    for side in (-1, 1):
        ink = np.maximum(ink, _soft_mask(np.hypot((u - side * 0.33) / 0.11, (v + 0.12) / np.maximum(eye, 0.02)) - 1,
                                         edge / 0.1))
        brow = _segment_dist(u, v, side * 0.33, -0.34 - raise_, -side * tilt, 0.15)
        ink = np.maximum(ink, _soft_mask(brow - 0.035, edge))
    ink = np.maximum(ink, _mouth(u, v, curve, opening, skew, edge))
    tone = col(rng.uniform(120, 230, n))
    image = col(rng.uniform(0, 100, n)) * (1 - face) + tone * face
    image = image * (1 - ink) + tone * col(rng.uniform(0.1, 0.45, n)) * ink
    image += rng.normal(0, 1, image.shape).astype(np.float32) * col(rng.uniform(2, 14, n))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _mouth(u: np.ndarray, v: np.ndarray, curve: np.ndarray, opening: np.ndarray, skew: np.ndarray,
           edge: np.ndarray) -> np.ndarray:
    """A curved band (smile > 0, frown < 0) that opens in the middle and may tilt to one side."""
    half_width = 0.32
    s = np.clip(u / half_width, -1, 1)
    centre = 0.45 - curve * (s ** 2 - 0.5) + skew * s * 0.3
    thickness = 0.03 + np.maximum(opening, 0) * (1 - s ** 2)
    inside_x = np.abs(u) - half_width
    dist = np.maximum(np.abs(v - centre) - thickness, inside_x)
    return _soft_mask(dist, edge)

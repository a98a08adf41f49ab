"""Batched data augmentation on the training device: one call augments a whole batch.

Every policy draws its random parameters per sample and applies them as tensor ops, so a
batch of 256 faces costs a handful of kernel launches instead of 256 PIL round trips. Images
are (B, 1, 48, 48) floats in [0, 1]; targets are (B, C) soft labels whose rows sum to 1, so
mixing policies can blend them. Normalisation (`normalize`) comes after augmentation, so that
fills, erasing and intensity ops work in the [0, 1] pixel range they are defined on.
"""

from __future__ import annotations

import math
from typing import Callable

import kornia.augmentation as K
import kornia.enhance
import torch
import torch.nn.functional as F
from torch import nn

from trainables.errors import UserError

# FER2013 Training-split pixel mean 129.47 and std 65.03, /255 (Training only, by protocol;
# the whole file, test splits included, gives 129.39 and 65.06).
MEAN, STD = 0.5077, 0.2551
_PAD = 4  # pixels of padding for the random crop

ImageOp = Callable[[torch.Tensor], torch.Tensor]
MixOp = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def to_input(x_uint8: torch.Tensor) -> torch.Tensor:
    """Turn (B, 48, 48) uint8 pixels into (B, 1, 48, 48) float32 in [0, 1] on the same device."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"to_input expects uint8 pixels, got {x_uint8.dtype}")
    x = x_uint8.unsqueeze(1) if x_uint8.dim() == 3 else x_uint8
    return x.to(torch.float32).div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Standardise [0, 1] pixels with FER2013's mean and std: (x - MEAN) / STD."""
    return (x - MEAN) / STD


class Augment:
    """A callable policy: image ops (per-sample random), then an optional batch mix.

    `aug(x, y)` returns augmented images in [0, 1] with x's shape, dtype and device, and
    (B, num_classes) targets whose rows sum to 1. `y` may also be (B,) integer labels, which
    are one-hot encoded first. Runs without autograd: augmentation needs no gradients.
    """

    def __init__(self, name: str, image_op: ImageOp | None = None, mix: MixOp | None = None,
                 num_classes: int = 7) -> None:
        self.name = name
        self.image_op = image_op
        self.mix = mix
        self.num_classes = num_classes

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = _as_targets(y, x.shape[0], self.num_classes, x.device)
        out = x.float()  # kornia and grid_sample want float32, whatever the caller's dtype
        if self.image_op is not None:
            out = self.image_op(out)
        if self.mix is not None:
            out, y = self.mix(out, y)
        return out.clamp(0.0, 1.0).to(x.dtype), y

    def __repr__(self) -> str:
        return f"Augment({self.name!r})"


def _as_targets(y: torch.Tensor, batch: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """(B,) integer labels -> one-hot float; (B, C) soft targets pass through as float."""
    if y.dim() == 1 and not y.is_floating_point():
        y = F.one_hot(y.long(), num_classes)
    if y.shape != (batch, num_classes):
        raise ValueError(f"targets must be ({batch}, {num_classes}) or ({batch},) labels, got {tuple(y.shape)}")
    return y.to(device=device, dtype=torch.float32)


# ---- flip/crop and "strong": kornia's per-sample augmentation modules ----

def _flip_crop() -> list[nn.Module]:
    """Horizontal flip (faces are roughly symmetric) and a 4-px reflect-padded random crop."""
    return [K.RandomHorizontalFlip(p=0.5), K.RandomCrop((48, 48), padding=_PAD, padding_mode="reflect")]


def _strong(magnitude: float) -> list[nn.Module]:
    """flip/crop, affine, brightness/contrast jitter and erasing, all scaled by `magnitude`.

    At the default 0.5: rotation up to 15 degrees, scale 1 +- 0.2, brightness and contrast
    factors 1 +- 0.4, and erasing on half of the images; at 0 it is plain flip/crop.
    """
    m = magnitude
    return _flip_crop() + [
        K.RandomAffine(degrees=30.0 * m, scale=(1.0 - 0.4 * m, 1.0 + 0.4 * m), p=1.0),
        K.ColorJitter(brightness=0.8 * m, contrast=0.8 * m, p=1.0),
        K.RandomErasing(p=m, scale=(0.02, 0.2), ratio=(0.3, 3.3)),
    ]


# ---- RandAugment / TrivialAugment, batched per sample ----
# kornia.augmentation.auto.RandAugment/TrivialAugment draw the *operation* once per batch
# (only magnitudes vary per row), so every face in a batch gets the same kind of distortion,
# and their default op lists include colour ops meaningless for gray images. So the op choice
# here is per sample, with a loop over the 13 op kinds, never over images (see _apply_ops).
# Geometric ops of one layer are fused into a single affine warp.

_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_INTENSITY = ("brightness", "contrast", "sharpness", "autocontrast", "equalize", "posterize", "solarize")
_OPS = ("identity",) + _GEOMETRIC + _INTENSITY
# Strength 1 (magnitude 1) of each op: roughly torchvision's RandAugment ranges, with
# translation cut to 30% because a face shifted by half its width loses the face.
_MAX_DEGREES, _MAX_SHEAR, _MAX_SHIFT, _MAX_FACTOR, _MAX_BITS_DROP = 30.0, 0.3, 0.3, 0.9, 4


def _affine_theta(op: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-sample (B, 2, 3) affine_grid matrices; identity for samples whose op is not geometric."""
    angle = torch.where(op == _OPS.index("rotate"), s * math.radians(_MAX_DEGREES), torch.zeros_like(s))
    shx = torch.where(op == _OPS.index("shear_x"), s * _MAX_SHEAR, torch.zeros_like(s))
    shy = torch.where(op == _OPS.index("shear_y"), s * _MAX_SHEAR, torch.zeros_like(s))
    # affine_grid works in [-1, 1] coordinates, so a shift by a fraction f of the width is 2f.
    tx = torch.where(op == _OPS.index("translate_x"), s * 2 * _MAX_SHIFT, torch.zeros_like(s))
    ty = torch.where(op == _OPS.index("translate_y"), s * 2 * _MAX_SHIFT, torch.zeros_like(s))
    cos, sin = torch.cos(angle), torch.sin(angle)
    row0 = torch.stack([cos + shx * sin, -sin + shx * cos, tx], dim=1)
    row1 = torch.stack([sin + shy * cos, cos - shy * sin, ty], dim=1)
    return torch.stack([row0, row1], dim=1)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply per-sample affine maps with zero (black) fill, as PIL/torchvision's ops do."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each image to span [0, 1]; flat images stay as they are."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3 ones with centre 5, /13) inside, original pixels on the border.

    Written as a separable 3x3 box sum of shifted slices, (box + 4 * centre) / 13, because
    kornia.enhance.sharpness's single-channel conv2d is about 10x slower on CPU.
    """
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    out = x.clone()
    out[..., 1:-1, 1:-1] = (box + 4.0 * x[..., 1:-1, 1:-1]) / 13.0
    return out


def _intensity(name: str, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Intensity op `name` on a batch, with signed per-sample strength s in [-1, 1]."""
    factor = (1.0 + s * _MAX_FACTOR).view(-1, 1, 1, 1)
    if name == "brightness":  # PIL: blend with black
        return x * factor
    if name == "contrast":  # PIL: blend with the image's mean grey
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return mean + (x - mean) * factor
    if name == "sharpness":  # PIL: blend with a smoothed copy; factor > 1 sharpens
        blurred = _smooth(x)
        return blurred + (x - blurred) * factor
    if name == "autocontrast":
        return _autocontrast(x)
    if name == "equalize":
        return kornia.enhance.equalize(x.clamp(0.0, 1.0))
    if name == "posterize":  # keep 8 - round(4|s|) bits of each 8-bit level
        step = torch.exp2(torch.round(s.abs() * _MAX_BITS_DROP)).view(-1, 1, 1, 1)
        return torch.floor(torch.round(x * 255.0) / step) * step / 255.0
    if name == "solarize":  # invert the pixels above a threshold that drops with strength
        return torch.where(x >= 1.0 - s.abs().view(-1, 1, 1, 1), 1.0 - x, x)
    raise AssertionError(name)


def _apply_ops(x: torch.Tensor, op: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Apply op index op[i] with signed strength s[i] to sample i, for all samples at once.

    On a GPU every op runs on the whole batch and torch.where picks each sample's result: at
    48x48 the GPU has compute to spare, and boolean indexing would stall it with a host sync
    per op. On a CPU compute is what is scarce, so each op runs only on the samples that drew it.
    """
    return _apply_ops_masked(x, op, s) if x.is_cuda else _apply_ops_subsets(x, op, s)


def _apply_ops_masked(x: torch.Tensor, op: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Sync-free version: every op on every sample, then select; identity warp for non-geometric ops."""
    out = _warp(x, _affine_theta(op, s))
    keep = op.view(-1, 1, 1, 1)
    for name in _INTENSITY:  # a loop over op kinds (7), not over images
        out = torch.where(keep == _OPS.index(name), _intensity(name, x, s).clamp(0.0, 1.0), out)
    return out


def _apply_ops_subsets(x: torch.Tensor, op: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Compute-saving version: each op only on the samples that drew it (same results)."""
    out = x.clone()
    geometric = (op >= _OPS.index(_GEOMETRIC[0])) & (op <= _OPS.index(_GEOMETRIC[-1]))
    if geometric.any():
        out[geometric] = _warp(x[geometric], _affine_theta(op[geometric], s[geometric]))
    for name in _INTENSITY:
        chosen = op == _OPS.index(name)
        if chosen.any():
            out[chosen] = _intensity(name, x[chosen], s[chosen]).clamp(0.0, 1.0)
    return out


class _PerSampleAutoAugment(nn.Module):
    """RandAugment (`num_ops` ops at fixed strength) or TrivialAugment (1 op, uniform strength).

    Each sample draws its own op (uniformly from `_OPS`, identity included), its own sign for
    symmetric ops and, for TrivialAugment, its own strength in [0, magnitude]. `magnitude` 1
    is the full range of every op (30 degrees, 0.3 shear, 30% shift, factors 0.1..1.9,
    4 bits, solarize threshold 0).
    """

    def __init__(self, magnitude: float, num_ops: int, uniform_strength: bool) -> None:
        super().__init__()
        self.magnitude, self.num_ops, self.uniform_strength = magnitude, num_ops, uniform_strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        for _ in range(self.num_ops):
            op = torch.randint(len(_OPS), (batch,), device=x.device)
            sign = torch.randint(2, (batch,), device=x.device, dtype=x.dtype) * 2 - 1
            strength = torch.full((batch,), self.magnitude, device=x.device, dtype=x.dtype)
            if self.uniform_strength:
                strength = strength * torch.rand(batch, device=x.device, dtype=x.dtype)
            x = _apply_ops(x, op, sign * strength)
        return x


# ---- MixUp / CutMix: our own, because kornia's take integer labels, not soft targets ----

def _beta(alpha: float, batch: int, device: torch.device) -> torch.Tensor:
    """One mixing weight per sample from Beta(alpha, alpha), drawn on `device`."""
    conc = torch.full((batch,), float(alpha), device=device)
    return torch.distributions.Beta(conc, conc).sample()


def _mixup(alpha: float) -> MixOp:
    """MixUp with a per-sample lambda: x = l*x + (1-l)*x[perm], targets likewise."""
    def mix(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = _beta(alpha, x.shape[0], x.device)
        perm = torch.randperm(x.shape[0], device=x.device)
        x = torch.lerp(x[perm], x, lam.view(-1, 1, 1, 1))
        return x, torch.lerp(y[perm], y, lam.view(-1, 1))
    return mix


def _cutmix(alpha: float) -> MixOp:
    """CutMix with a per-sample box; each target is mixed by the box's actual (clipped) area."""
    def mix(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, h, w = x.shape
        cut = torch.sqrt(1.0 - _beta(alpha, batch, x.device))  # box side as a fraction of the image
        cy = torch.rand(batch, device=x.device) * h
        cx = torch.rand(batch, device=x.device) * w
        rows = torch.arange(h, device=x.device).view(1, h, 1) + 0.5
        cols = torch.arange(w, device=x.device).view(1, 1, w) + 0.5
        inside_y = (rows - cy.view(-1, 1, 1)).abs() < (cut * h / 2).view(-1, 1, 1)
        inside_x = (cols - cx.view(-1, 1, 1)).abs() < (cut * w / 2).view(-1, 1, 1)
        box = (inside_y & inside_x).unsqueeze(1)  # (B, 1, H, W), clipped at the borders
        perm = torch.randperm(batch, device=x.device)
        area = box.float().mean(dim=(1, 2, 3)).view(-1, 1)
        return torch.where(box, x[perm], x), torch.lerp(y, y[perm], area)
    return mix


# ---- registry ----

def _none(*, magnitude: float, mix_alpha: float, num_classes: int) -> Augment:
    """Identity: no augmentation."""
    return Augment("none", num_classes=num_classes)


def _flip_crop_policy(*, magnitude: float, mix_alpha: float, num_classes: int) -> Augment:
    """Horizontal flip and 4-px padded random crop."""
    return Augment("flip_crop", nn.Sequential(*_flip_crop()), num_classes=num_classes)


def _strong_policy(*, magnitude: float, mix_alpha: float, num_classes: int) -> Augment:
    """flip/crop + affine + brightness/contrast + erasing, scaled by magnitude."""
    return Augment("strong", nn.Sequential(*_strong(magnitude)), num_classes=num_classes)


def _randaugment(*, magnitude: float, mix_alpha: float, num_classes: int) -> Augment:
    """flip/crop, then RandAugment: two per-sample ops at strength `magnitude`."""
    ops = nn.Sequential(*_flip_crop(), _PerSampleAutoAugment(magnitude, num_ops=2, uniform_strength=False))
    return Augment("randaugment", ops, num_classes=num_classes)


def _trivialaugment(*, magnitude: float, mix_alpha: float, num_classes: int) -> Augment:
    """flip/crop, then TrivialAugment: one per-sample op at strength U(0, magnitude)."""
    ops = nn.Sequential(*_flip_crop(), _PerSampleAutoAugment(magnitude, num_ops=1, uniform_strength=True))
    return Augment("trivialaugment", ops, num_classes=num_classes)


def _mixup_policy(*, magnitude: float, mix_alpha: float, num_classes: int) -> Augment:
    """flip/crop, then MixUp with Beta(mix_alpha, mix_alpha) per sample."""
    return Augment("mixup", nn.Sequential(*_flip_crop()), _mixup(mix_alpha), num_classes)


def _cutmix_policy(*, magnitude: float, mix_alpha: float, num_classes: int) -> Augment:
    """flip/crop, then CutMix with Beta(mix_alpha, mix_alpha) per sample."""
    return Augment("cutmix", nn.Sequential(*_flip_crop()), _cutmix(mix_alpha), num_classes)


POLICIES: dict[str, Callable[..., Augment]] = {
    "none": _none,
    "flip_crop": _flip_crop_policy,
    "strong": _strong_policy,
    "randaugment": _randaugment,
    "trivialaugment": _trivialaugment,
    "mixup": _mixup_policy,
    "cutmix": _cutmix_policy,
}


def build_augment(name: str, *, magnitude: float = 0.5, mix_alpha: float = 1.0, num_classes: int = 7) -> Augment:
    """Build augmentation policy `name` from POLICIES.

    `magnitude` in [0, 1] scales the strength of "strong", "randaugment" and "trivialaugment"
    (1 is each op's full range); `mix_alpha` > 0 is the Beta parameter of the mixing weight
    for "mixup" and "cutmix". Unknown names or out-of-range values raise
    UserError.
    """
    if name not in POLICIES:
        raise UserError(f"unknown augmentation policy {name!r}; choose from {list(POLICIES)}")
    if not 0.0 <= magnitude <= 1.0:
        raise UserError(f"augmentation magnitude must be in [0, 1], got {magnitude}")
    if not mix_alpha > 0.0:
        raise UserError(f"mix_alpha must be positive, got {mix_alpha}")
    if num_classes < 2:
        raise UserError(f"num_classes must be at least 2, got {num_classes}")
    return POLICIES[name](magnitude=magnitude, mix_alpha=mix_alpha, num_classes=num_classes)

"""What a trained network looks at and how it arranges faces: Grad-CAM, penultimate features, channel responses.

Plain PyTorch on uint8 48x48 faces, as everywhere in `trainables`. Grad-CAM is captum's
`LayerGradCam` (Selvaraju et al., 2017: the layer's activations weighted by the spatially
averaged gradient of the class score, then a ReLU), upsampled with captum's
`LayerAttribution.interpolate`; it is not re-implemented here. The layer explained is the
one `activations.png` shows: the deepest convolution whose output is still at least 6 pixels
wide, coarse enough to be semantic and fine enough to say *where* on the face.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from trainables.augment import normalize, to_input
from trainables.models import forward_with_hooks


def explained_layer(model: nn.Module, x_uint8: torch.Tensor, min_side: int = 6) -> nn.Module:
    """The deepest Conv2d whose output on `x_uint8` is at least `min_side` pixels wide (else the first one)."""
    sizes: list[tuple[nn.Module, int]] = []
    x = normalize(to_input(x_uint8[:2].to(_device(model))))
    forward_with_hooks(model.eval(), x, [m for m in model.modules() if isinstance(m, nn.Conv2d)],
                       lambda mod, _, out: sizes.append((mod, out.shape[-1])))
    wide = [mod for mod, side in sizes if side >= min_side]
    return wide[-1] if wide else sizes[0][0]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def grad_cam(model: nn.Module, x_uint8: torch.Tensor, targets: torch.Tensor, *, layer: nn.Module | None = None,
             batch: int = 128) -> np.ndarray:
    """Grad-CAM of class `targets[i]` on image i: (N, H, W) float32 at the input's size, each scaled to a max of 1.

    A map that is zero everywhere (the class score does not rise with any positive evidence
    at that layer) stays zero.
    """
    from captum.attr import LayerAttribution, LayerGradCam

    model.eval()
    device = _device(model)
    layer = layer or explained_layer(model, x_uint8)
    cam = LayerGradCam(model, layer)
    out = []
    for i in range(0, len(x_uint8), batch):
        x = normalize(to_input(x_uint8[i:i + batch].to(device)))
        with torch.enable_grad():
            a = cam.attribute(x, target=targets[i:i + batch].to(device), relu_attributions=True)
        a = LayerAttribution.interpolate(a.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
        peak = a.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        out.append((a / peak).float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def penultimate_features(model: nn.Module, x_uint8: torch.Tensor, *, batch: int = 512) -> np.ndarray:
    """(N, D) inputs of the model's last linear layer (the classifier): the representation it separates classes in."""
    model.eval()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    grabbed: list[torch.Tensor] = []
    hook = last.register_forward_pre_hook(lambda mod, args: grabbed.append(args[0].detach().float().flatten(1)))
    try:
        for i in range(0, len(x_uint8), batch):
            model(normalize(to_input(x_uint8[i:i + batch].to(_device(model)))))
    finally:
        hook.remove()
    return torch.cat(grabbed).cpu().numpy()


@torch.no_grad()
def channel_responses(model: nn.Module, x_uint8: torch.Tensor, layer: nn.Module, *, batch: int = 512) -> np.ndarray:
    """(N, C) each channel's strongest response (max over the grid) of `layer`'s output on each image."""
    model.eval()
    grabbed: list[torch.Tensor] = []
    for i in range(0, len(x_uint8), batch):
        forward_with_hooks(model, normalize(to_input(x_uint8[i:i + batch].to(_device(model)))), [layer],
                           lambda mod, _, out: grabbed.append(out.detach().float().flatten(2).amax(2)))
    return torch.cat(grabbed).cpu().numpy()

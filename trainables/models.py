"""Model registry: every architecture takes (B, 1, 48, 48) faces and returns (B, num_classes) logits.

Each model is a `FerNet`: an optional on-device upsampling step, a backbone that ends in a
flat feature vector, and a `head` (dropout + linear). Keeping that one shape for every family
is what lets the training loop and `set_backbone_frozen` ignore the family.
ResNets and DenseNets come from torchvision (weights=None) with their first convolution
rebuilt for one input channel; `pretrained=True` loads ImageNet weights from a local file
only, never from the network.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from trainables.errors import UserError

STEMS = ("keep", "stride", "imagenet")
INPUT_SIZES = (48, 96, 112, 224)

# arch -> (family, name of torchvision's weights enum); the enum gives the cache file names torchvision uses.
# torchvision is imported only where one of these is built or its weights looked up: importing it costs
# about 2 s of a core, which every ConvNet trial's worker process (and every command) would pay for nothing.
_TORCHVISION = {
    "resnet18": ("resnet", "ResNet18_Weights"),
    "resnet34": ("resnet", "ResNet34_Weights"),
    "resnet50": ("resnet", "ResNet50_Weights"),
    "resnet101": ("resnet", "ResNet101_Weights"),
    "densenet121": ("densenet", "DenseNet121_Weights"),
    "densenet169": ("densenet", "DenseNet169_Weights"),
}
# Where each family keeps its first convolution and its classifier, as state-dict keys.
_FIRST_CONV = {"resnet": "conv1.weight", "densenet": "features.conv0.weight"}
_HEAD_PREFIX = {"resnet": "fc.", "densenet": "classifier."}
# torchvision's hosted DenseNet files predate the ban on '.' in module names ('norm.1' for
# 'norm1'); this is the pattern torchvision.models.densenet._load_state_dict uses to fix them.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


class FerNet(nn.Module):
    """Upsample to `input_size` (if needed), run the backbone to flat features, then the head.

    The upsampling lives inside the model so that the data stays 48x48 uint8 in memory and
    only the current batch is enlarged, on the training device.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, input_size: int = 48) -> None:
        super().__init__()
        self.input_size = input_size
        self.backbone = backbone
        self.head = head
        self.backbone_frozen = False

    def train(self, mode: bool = True) -> "FerNet":
        """Train mode, except that a frozen backbone stays in eval mode, so that its BatchNorm
        layers keep their (ImageNet) running statistics instead of drifting to the faces'."""
        super().train(mode)
        if mode and self.backbone_frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.head(self.backbone(x))


def _head(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """The classifier every family shares: dropout then one linear layer."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """conv3x3-BN-ReLU then a 2x2 max-pool: one conv per block keeps the CPU cost low."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def _build_convnet(*, num_classes: int, width: int, depth: int, dropout: float, input_size: int, **_: object) -> FerNet:
    """Small CNN: `depth` blocks of width, 2*width, 4*width channels, a 6x6 grid, a 256-unit layer, the head.

    The features keep a 6x6 grid rather than a global average because on aligned faces *where*
    a feature fires (eyes vs mouth) carries the expression; the adaptive pool keeps that grid the
    same size for every depth and input size. The grid is thousands of non-negative features, so
    a linear layer straight on it takes huge steps at SGD learning rates (the loss blew up to
    ~10 in the first epoch at lr 0.05); a batch-normalised 256-unit layer in between keeps the
    scale fixed and trains stably across the searched learning rates.
    """
    channels = [1] + [width * 2**i for i in range(depth)]
    blocks = [_conv_block(c_in, c_out) for c_in, c_out in zip(channels[:-1], channels[1:])]
    backbone = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(6), nn.Flatten(),
                             nn.Linear(channels[-1] * 36, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(inplace=True))
    return FerNet(backbone, _head(256, num_classes, dropout), input_size)


def _gray_stem(stem: str, out_channels: int) -> tuple[nn.Conv2d, nn.Module | None]:
    """A one-channel first conv for `stem`, and the pool that follows it (None: keep torchvision's)."""
    if stem == "imagenet":
        conv = nn.Conv2d(1, out_channels, 7, stride=2, padding=3, bias=False)
        pool = None
    else:  # "keep" holds 48x48 for accuracy; "stride" halves it once for ~4x less compute.
        conv = nn.Conv2d(1, out_channels, 3, stride=1 if stem == "keep" else 2, padding=1, bias=False)
        pool = nn.Identity()
    # torchvision's own conv initialisation, so a rebuilt stem starts like the rest of the net.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv, pool


def _torchvision_backbone(arch: str, stem: str) -> tuple[nn.Module, int]:
    """torchvision `arch` (random weights) with a one-channel stem and its classifier removed."""
    import torchvision.models

    family, _ = _TORCHVISION[arch]
    net = getattr(torchvision.models, arch)(weights=None)
    if family == "resnet":
        net.conv1, pool = _gray_stem(stem, net.conv1.out_channels)
        net.maxpool = pool or net.maxpool
        in_features, net.fc = net.fc.in_features, nn.Identity()
    else:
        net.features.conv0, pool = _gray_stem(stem, net.features.conv0.out_channels)
        net.features.pool0 = pool or net.features.pool0
        in_features, net.classifier = net.classifier.in_features, nn.Identity()
    return net, in_features


def _build_torchvision(
    arch: str,
    *,
    num_classes: int,
    stem: str,
    dropout: float,
    pretrained: bool,
    weights_path: str | None,
    input_size: int,
    **_: object,
) -> FerNet:
    """A torchvision ResNet/DenseNet adapted to grayscale, optionally with ImageNet weights."""
    backbone, in_features = _torchvision_backbone(arch, stem)
    if pretrained:
        _load_imagenet(backbone, arch, stem, weights_path)
    return FerNet(backbone, _head(in_features, num_classes, dropout), input_size)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "convnet": _build_convnet,
    **{arch: partial(_build_torchvision, arch) for arch in _TORCHVISION},
}


def _check_options(arch: str, num_classes: int, stem: str, width: int, depth: int, dropout: float,
                   pretrained: bool, input_size: int) -> None:
    """Raise UserError for any option a user could have mistyped, naming the valid choices."""
    if arch not in MODELS:
        raise UserError(f"unknown model {arch!r}; choose from {sorted(MODELS)}")
    if stem not in STEMS:
        raise UserError(f"unknown stem {stem!r}; choose from {list(STEMS)}")
    if input_size not in INPUT_SIZES:
        raise UserError(f"input_size {input_size} is not supported; choose from {list(INPUT_SIZES)}")
    if num_classes < 2:
        raise UserError(f"num_classes must be at least 2, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {dropout}")
    if arch == "convnet":
        if depth not in (2, 3):
            raise UserError(f"convnet depth must be 2 or 3, got {depth}")
        if width < 1:
            raise UserError(f"convnet width must be positive, got {width}")
        if pretrained:
            raise UserError("there are no ImageNet weights for convnet; use pretrained=False or a resnet/densenet")


def build_model(
    arch: str,
    *,
    num_classes: int = 7,
    stem: str = "stride",
    width: int = 32,
    depth: int = 3,
    dropout: float = 0.0,
    pretrained: bool = False,
    weights_path: str | None = None,
    input_size: int = 48,
) -> nn.Module:
    """Build registry model `arch` for (B, 1, 48, 48) input and (B, num_classes) logits.

    `width`/`depth` shape the convnet only; `stem` ("keep", "stride", "imagenet") picks the
    first layer of ResNets/DenseNets; `input_size` != 48 upsamples each batch inside the model
    (use 112/224 with stem "imagenet"). `pretrained` loads ImageNet weights from `weights_path`
    or torchvision's cache (see `pretrained_weights_path`); nothing is downloaded. Invalid
    options raise UserError.
    """
    _check_options(arch, num_classes, stem, width, depth, dropout, pretrained, input_size)
    return MODELS[arch](num_classes=num_classes, stem=stem, width=width, depth=depth, dropout=dropout,
                        pretrained=pretrained, weights_path=weights_path, input_size=input_size)


def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) everything but the head: no gradients, and BatchNorm statistics held.

    A frozen backbone's parameters get requires_grad=False and the backbone stays in eval
    mode whenever the model trains (see `FerNet.train`).
    """
    head = {id(p) for p in model.head.parameters()}
    for p in model.parameters():
        if id(p) not in head:
            p.requires_grad_(not frozen)
    model.backbone_frozen = frozen
    model.train(model.training)


def forward_with_hooks(model: nn.Module, x: torch.Tensor, modules, hook) -> None:
    """Run `model(x)` without gradients with forward `hook` on each of `modules`, removed afterwards."""
    hooks = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()


def _weights_enum(arch: str):
    """torchvision's weights enum of `arch` (e.g. ResNet18_Weights)."""
    import torchvision.models

    return getattr(torchvision.models, _TORCHVISION[arch][1])


def _weight_files(arch: str) -> list[str]:
    """torchvision's cache file names for `arch`, its default weights first."""
    if arch not in _TORCHVISION:
        raise UserError(f"there are no ImageNet weights for {arch!r}; choose from {sorted(_TORCHVISION)}")
    weights = _weights_enum(arch)
    ordered = [weights.DEFAULT] + [w for w in weights if w is not weights.DEFAULT]
    return [Path(w.url).name for w in ordered]


def pretrained_weights_path(arch: str, weights_path: str | None = None) -> Path:
    """Where the ImageNet weights for `arch` are expected: `weights_path` if given, else the cache.

    The cache is torchvision's, `torch.hub.get_dir()/checkpoints/<file>` (so it honours
    TORCH_HOME). Where torchvision has several ImageNet versions (resnet50, resnet101) the
    first one present wins, the default version being tried first; if none is present the
    default's path is returned.
    """
    if weights_path is not None:
        return Path(weights_path).expanduser()
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = [folder / name for name in _weight_files(arch)]
    return next((p for p in candidates if p.is_file()), candidates[0])


def _missing_weights_message(arch: str, path: Path, explicit: bool) -> str:
    """Say which file is missing and how to get it onto an offline machine."""
    default = _weights_enum(arch).DEFAULT.name
    fetch = f"python -c \"import torchvision; torchvision.models.{arch}(weights='{default}')\""
    if explicit:
        return f"ImageNet weights file {path} does not exist; fix weights_path, or fetch it with: {fetch}"
    return (f"ImageNet weights for {arch} not found: expected {path}; on a machine with internet run "
            f"{fetch} and copy {path.name} into {path.parent} here (set TORCH_HOME to use another "
            f"cache folder), or pass weights_path")


def _read_state_dict(path: Path, arch: str) -> dict[str, torch.Tensor]:
    """torch.load a state dict safely (weights_only) and turn any failure into a UserError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and unpickler-policy errors all mean "not a weights file"
        raise UserError(f"could not read {path} as {arch} ImageNet weights ({type(err).__name__}: {err}); "
                        "re-download the file") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors; expected torchvision's {arch} weights file")
    return dict(state)


def _adapt_state_dict(state: dict[str, torch.Tensor], family: str, stem: str) -> dict[str, torch.Tensor]:
    """Rename old DenseNet keys, drop the ImageNet classifier, and make the first conv gray.

    With the "imagenet" stem the RGB filters are summed over their input channels: a gray
    image replicated into R, G and B gives conv(w, [g, g, g]) = conv(w_R + w_G + w_B, g), so
    the summed filter sees a gray face exactly as the RGB net would. With "keep"/"stride" the
    3x3 stem cannot reuse 7x7 filters, so it keeps its fresh initialisation and trains.
    """
    state = {(_DENSENET_OLD_KEY.sub(r"\1\2", k) if family == "densenet" else k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIX[family])}
    first = state.pop(_FIRST_CONV[family], None)
    if first is not None and stem == "imagenet":
        state[_FIRST_CONV[family]] = first.sum(dim=1, keepdim=True)
    return state


def _load_imagenet(backbone: nn.Module, arch: str, stem: str, weights_path: str | None) -> None:
    """Load ImageNet weights into `backbone`, refusing files whose keys or shapes don't match."""
    family = _TORCHVISION[arch][0]
    path = pretrained_weights_path(arch, weights_path)
    if not path.is_file():
        raise UserError(_missing_weights_message(arch, path, weights_path is not None))
    state = _adapt_state_dict(_read_state_dict(path, arch), family, stem)
    expected = backbone.state_dict()
    # Files saved before PyTorch 0.4.1 lack BN's num_batches_tracked; BN fills it in itself.
    optional = {_FIRST_CONV[family]} if stem != "imagenet" else set()
    missing = [k for k in expected if k not in state and k not in optional and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshapen = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or misshapen:
        raise UserError(
            f"{path} does not match torchvision's {arch}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(misshapen)} of the wrong shape "
            f"{misshapen[:3]}; is it the {arch} ImageNet file?"
        )
    backbone.load_state_dict(state, strict=False)

"""One trial's hyperparameters as a typed, frozen `TrialConfig`.

A space (see `spaces`) returns a flat dict; Ray Tune hands that dict to the trainable,
and the final stage reads it back from Tune's results. `TrialConfig.from_dict` is the
one place where such a dict becomes typed values: it converts each value once (an int
that a table stored as 64.0, a bool stored as "True"), drops the keys that only steer
Optuna's define-by-run branching, and rejects an unknown key with a one-line error, so
a typo in a space fails loudly instead of silently training with the default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from trainables.errors import UserError

# Keys a space suggests only to branch (which family, which architecture of a family); the
# architecture itself reaches the config as `arch`, so these carry nothing for training.
# The same holds for the per-optimizer names of the rate and AdamW's decay (see `spaces`): the space
# returns their value as `lr` and `weight_decay`.
OPTUNA_ONLY = ("family", "convnet_arch", "resnet_arch", "densenet_arch", "sgd_lr", "adam_lr", "adamw_weight_decay")
# Schedule settings of older experiments, in epochs, and the fraction of the run each became.
EPOCH_SETTINGS = {"warmup_epochs": "warmup_fraction", "step_epochs": "step_fraction",
                  "plateau_patience": "patience_fraction"}


def in_epochs(values: Mapping[str, Any]) -> list[str]:
    """The schedule settings of `values` that are in epochs (an experiment from an older version)."""
    return [k for k in EPOCH_SETTINGS if k in values]


def as_fractions(values: Mapping[str, Any], epochs: int) -> dict[str, Any]:
    """An older config's schedule settings in epochs, as fractions of its `epochs`-epoch run (the same
    shape that run had); a config without them unchanged."""
    out = {k: v for k, v in values.items() if k not in EPOCH_SETTINGS}
    for old, new in EPOCH_SETTINGS.items():
        if old in values and values[old] == values[old]:  # NaN: the trial's schedule did not use it
            out[new] = float(values[old]) / max(1, int(epochs))
    return out


@dataclass(frozen=True)
class TrialConfig:
    """Every hyperparameter a trial may set; a space leaves out what it does not search."""

    # model
    arch: str = "convnet"              # a key of trainables.models.MODELS
    stem: str = "stride"               # ResNet/DenseNet first layer: keep, stride or imagenet
    width: int = 32                    # convnet channels of the first block
    depth: int = 3                     # convnet blocks (2 or 3)
    dropout: float = 0.0               # before the classifier
    pretrained: bool = False           # start from ImageNet weights (ResNet/DenseNet)
    input_size: int = 48               # faces upsampled to this side on the device
    freeze_epochs: int = 0             # epochs with the backbone frozen (pretrained only)
    # optimisation
    optimizer: str = "sgd"             # a key of trainables.optim.OPTIMIZERS
    lr: float = 0.05                   # peak learning rate (lr_mode=searched)
    lr_mode: str = "searched"          # searched: use `lr`; range_test: find it per trial
    momentum: float = 0.9              # SGD momentum (Nesterov) or Adam's beta1
    weight_decay: float = 5e-4
    batch_size: int = 64
    schedule: str = "cosine"           # a key of trainables.optim.SCHEDULES
    # The schedule's settings are fractions of the run, so a trial and a longer final run share one shape.
    warmup_fraction: float = 0.0       # linear warm-up, as a share of the run (onecycle: 0 means 0.3)
    step_fraction: float = 0.25        # schedule=step: a cut every this share of the run
    step_gamma: float = 0.1            # schedule=step: factor of each cut
    patience_fraction: float = 0.2     # schedule=plateau: a share of the run's epochs without a new best
    plateau_factor: float = 0.3        # schedule=plateau: factor of each cut
    # data
    augment: str = "flip_crop"         # a key of trainables.augment.POLICIES
    aug_magnitude: float = 0.5         # strength of strong/randaugment/trivialaugment
    mix_alpha: float = 1.0             # Beta(alpha, alpha) of mixup/cutmix
    label_smoothing: float = 0.0
    imbalance: str = "none"            # none, weighted_loss or balanced_sampler
    soft_labels: bool = False          # FER+: train on the vote distribution
    ferplus_votes: float = 0.0         # FER2013 labels: this share of the target is the image's FER+ votes
    # weights
    ema_fraction: float = 0.0          # average the weights (EMA) over this share of the run; 0: off (see runner)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrialConfig":
        """Build a config from a space's (or Tune's, or a weights file's) dict; see the module doc."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        if in_epochs(values):
            raise UserError(f"schedule settings in epochs ({', '.join(in_epochs(values))}) are from an older "
                            f"version, where they are fractions of the run "
                            f"({', '.join(EPOCH_SETTINGS[k] for k in in_epochs(values))})")
        unknown = sorted(k for k in values if k not in known and k not in OPTUNA_ONLY)
        if unknown:
            raise UserError(f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} in a trial config; "
                            f"known: {', '.join(sorted(known))}")
        typed = {k: _convert(k, v, type(known[k].default)) for k, v in values.items() if k in known}
        return cls(**typed)

    @classmethod
    def of(cls, config: "TrialConfig | Mapping[str, Any]") -> "TrialConfig":
        """`config` itself when it is already a TrialConfig, else `from_dict(config)`."""
        return config if isinstance(config, TrialConfig) else cls.from_dict(config)

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain JSON value (what weights files and checkpoints store)."""
        return dataclasses.asdict(self)


def field_names() -> tuple[str, ...]:
    """The names of every hyperparameter, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(TrialConfig))


def _convert(key: str, value: Any, kind: type) -> Any:
    """`value` as `kind` (bool, int, float or str), accepting what JSON, CSV and numpy make of it."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy and torch scalars
        value = value.item()
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise UserError(f"hyperparameter {key}={value!r} is not a {kind.__name__}")

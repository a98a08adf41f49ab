"""Search spaces: define-by-run functions over a trial, and the SPACES registry.

A space only calls `trial.suggest_*` (and may branch on what it drew) and returns
constants; it does no I/O and no computation, so `optuna.trial.FixedTrial` tests
it without a study. Names are the fields of `trainables.config.TrialConfig` (plus the
branching keys in `trainables.config.OPTUNA_ONLY`).
Ranges are shared between families so that the `all` space stays one consistent
Optuna search space (Optuna rejects a categorical whose choices change).
"""
from __future__ import annotations

from typing import Any, Callable

from trainables.errors import UserError

CONVNETS = ["convnet"]
RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101"]
DENSENETS = ["densenet121", "densenet169"]
FAMILIES = {"convnet": CONVNETS, "resnet": RESNETS, "densenet": DENSENETS}
AUGMENTS = ["none", "flip_crop", "strong", "randaugment", "trivialaugment", "mixup", "cutmix"]
MAGNITUDE_AUGMENTS = ("strong", "randaugment", "trivialaugment")
SCHEDULES = ["cosine", "onecycle", "step", "plateau", "constant"]


# Each optimizer's rate and decay under a name of its own, where its good values lie, so that the
# sampler never pools one optimizer's good values with another's (TPE would pull SGD's rates to
# the bottom of SGD's range after good Adam trials, and vice versa); the space returns them as
# `lr` and `weight_decay`, what the trainable reads. SGD's and Adam's decay is an L2 penalty
# (good near 1e-5..1e-3); AdamW's is decoupled from the gradient (Loshchilov & Hutter, "Decoupled
# Weight Decay Regularization", ICLR 2019) and works at 1e-2..1e-1 (PyTorch's default 1e-2).
LR_RANGES = {"sgd_lr": (1e-3, 0.3), "adam_lr": (1e-4, 1e-2)}
DECAY_RANGES = {"weight_decay": (1e-6, 1e-2), "adamw_weight_decay": (1e-3, 0.3)}


def lr_name(optimizer: str) -> str:
    """The Optuna parameter that holds `optimizer`'s searched rate."""
    return "sgd_lr" if optimizer == "sgd" else "adam_lr"


def decay_name(optimizer: str) -> str:
    """The Optuna parameter that holds `optimizer`'s weight decay."""
    return "adamw_weight_decay" if optimizer == "adamw" else "weight_decay"


def with_optuna_names(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with its rate and decay also under the space's per-optimizer names, for replaying a
    config written with `lr` and `weight_decay` (a known-good recipe, an older experiment's trial)."""
    out = dict(config)
    optimizer = out.get("optimizer")
    if optimizer in ("sgd", "adam", "adamw"):
        if "lr" in out and out.get("lr_mode", "searched") == "searched":
            out.setdefault(lr_name(optimizer), out["lr"])
        if "weight_decay" in out:
            out.setdefault(decay_name(optimizer), out["weight_decay"])
    return out


# The share of a training target that is the image's FER+ votes (trainables.data.ferplus.vote_targets): none,
# half (the label keeps its say where FER+ disagrees) or all of it.
VOTE_SHARES = [0.0, 0.5, 1.0]


def _training(trial, *, ferplus: bool = False, votes: bool = False) -> dict[str, Any]:
    """Dimensions every family shares: optimizer, LR, schedule, augmentation, loss and sampling."""
    optimizer = trial.suggest_categorical("optimizer", ["sgd", "adam", "adamw"])
    lr_mode = trial.suggest_categorical("lr_mode", ["searched", "range_test"])
    out: dict[str, Any] = {}
    if lr_mode == "searched":
        out["lr"] = trial.suggest_float(lr_name(optimizer), *LR_RANGES[lr_name(optimizer)], log=True)
    out["weight_decay"] = trial.suggest_float(decay_name(optimizer), *DECAY_RANGES[decay_name(optimizer)], log=True)
    trial.suggest_categorical("batch_size", [32, 64, 128, 256])
    schedule = trial.suggest_categorical("schedule", SCHEDULES)
    # Fractions of the run (trainables.optim.Schedule): a trial and its longer final run share one shape.
    trial.suggest_float("warmup_fraction", 0.0, 0.3)
    if schedule == "step":
        trial.suggest_float("step_fraction", 0.15, 0.5)
        trial.suggest_float("step_gamma", 0.05, 0.5, log=True)
    elif schedule == "plateau":
        trial.suggest_float("patience_fraction", 0.05, 0.3)
        trial.suggest_float("plateau_factor", 0.1, 0.5)
    augment = trial.suggest_categorical("augment", AUGMENTS)
    if augment in MAGNITUDE_AUGMENTS:  # the others have no strength to tune
        trial.suggest_float("aug_magnitude", 0.1, 1.0)
    if augment in ("mixup", "cutmix"):
        trial.suggest_float("mix_alpha", 0.1, 2.0, log=True)
    trial.suggest_float("label_smoothing", 0.0, 0.2)
    trial.suggest_categorical("imbalance", ["none", "weighted_loss", "balanced_sampler"])
    if ferplus:  # FER+ votes can be the training target instead of the majority label
        trial.suggest_categorical("soft_labels", [False, True])
    elif votes:  # FER2013 labels with the FER+ votes at hand: the votes can share the target, for noisy labels
        trial.suggest_categorical("ferplus_votes", VOTE_SHARES)
    return out


def _arch(trial, family: str) -> str:
    # One categorical per family: a shared "arch" would change its choices between branches.
    choices = FAMILIES[family]
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(f"{family}_arch", choices)


def convnet(trial, *, ferplus: bool = False, offer_weights: bool = False,
            votes: bool = False) -> dict[str, Any]:
    """The small 2-3 block ConvNet: width, depth and dropout, plus the shared training dimensions."""
    trial.suggest_categorical("width", [16, 32, 48, 64])
    trial.suggest_int("depth", 2, 3)
    trial.suggest_float("dropout", 0.0, 0.5)
    return {"arch": _arch(trial, "convnet"), **_training(trial, ferplus=ferplus, votes=votes)}


def _torchvision_family(trial, family: str, *, ferplus: bool, offer_weights: bool, votes: bool) -> dict[str, Any]:
    arch = _arch(trial, family)
    # `offer_weights`: the ImageNet files are available, so starting from them is a choice.
    use_weights = trial.suggest_categorical("pretrained", [False, True]) if offer_weights else False
    stem = trial.suggest_categorical("stem", ["stride", "keep", "imagenet"])
    if use_weights and stem == "imagenet":
        # Only ImageNet's own stem carries pretrained first-layer weights (the 3x3 stems start fresh),
        # so only it may be frozen; and upsampling pays off only with its 4x downsampling.
        trial.suggest_categorical("input_size", [48, 96, 112, 224])
        trial.suggest_int("freeze_epochs", 0, 3)
    trial.suggest_float("dropout", 0.0, 0.5)
    return {"arch": arch, "pretrained": use_weights, **_training(trial, ferplus=ferplus, votes=votes)}


def resnet(trial, *, ferplus: bool = False, offer_weights: bool = False,
            votes: bool = False) -> dict[str, Any]:
    """ResNet-18/34/50/101: depth, stem, optional ImageNet weights, plus the shared dimensions."""
    return _torchvision_family(trial, "resnet", ferplus=ferplus, offer_weights=offer_weights, votes=votes)


def densenet(trial, *, ferplus: bool = False, offer_weights: bool = False,
            votes: bool = False) -> dict[str, Any]:
    """DenseNet-121/169: as `resnet`."""
    return _torchvision_family(trial, "densenet", ferplus=ferplus, offer_weights=offer_weights, votes=votes)


def all_families(trial, *, ferplus: bool = False, offer_weights: bool = False,
            votes: bool = False) -> dict[str, Any]:
    """The union: first the family, then that family's space."""
    family = trial.suggest_categorical("family", list(FAMILIES))
    return SPACES[family](trial, ferplus=ferplus, offer_weights=offer_weights, votes=votes)


SPACES: dict[str, Callable[..., dict[str, Any]]] = {
    "convnet": convnet, "resnet": resnet, "densenet": densenet, "all": all_families,
}


def with_constants(trial, *, space: Callable[..., dict[str, Any]], constants: dict[str, Any]) -> dict[str, Any]:
    """`space(trial)` with `constants` added to every configuration (a search-wide setting such as
    ema_fraction); a module function, so that `functools.partial` of it pickles with Tune's searcher."""
    return {**space(trial), **constants}


def get_space(name: str) -> Callable[..., dict[str, Any]]:
    """The space registered as `name`, or a UserError listing the choices."""
    if name not in SPACES:
        raise UserError(f"unknown space '{name}'; choose from {sorted(SPACES)}")
    return SPACES[name]


def archs_of(name: str) -> list[str]:
    """The architectures a space can draw (for checking weights and resources up front)."""
    return [a for fam, archs in FAMILIES.items() if name in (fam, "all") for a in archs]

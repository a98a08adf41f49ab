"""Plain-PyTorch training: optimizers, LR schedules, `train_one_epoch`, `evaluate`.

A trial config (a flat dict of hyperparameters) becomes a `Run` through
`build_run`; `run_epoch` trains one epoch and evaluates on PublicTest. The Ray
trainable and the final retrain stage both drive a `Run`, so what the search
measured is exactly what the final stage retrains. Nothing here imports Ray.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainables.augment import build_augment, normalize, to_input
from trainables.data import FERData, Split, class_counts
from trainables.errors import UserError
from trainables.models import build_model, set_backbone_frozen

# The search objective, named once: best PublicTest accuracy.
METRIC, MODE = "val_acc", "max"

# Every hyperparameter a config may set, with the value used when a space leaves it out.
DEFAULTS: dict[str, Any] = {
    "arch": "convnet", "stem": "stride", "width": 32, "depth": 3, "dropout": 0.0,
    "pretrained": False, "input_size": 48, "freeze_epochs": 0,
    "optimizer": "sgd", "lr": 0.05, "lr_mode": "searched", "momentum": 0.9, "weight_decay": 5e-4,
    "batch_size": 64, "schedule": "cosine", "warmup_epochs": 0.0,
    "step_epochs": 10, "step_gamma": 0.1, "plateau_patience": 2, "plateau_factor": 0.3,
    "augment": "flip_crop", "aug_magnitude": 0.5, "mix_alpha": 1.0,
    "label_smoothing": 0.0, "imbalance": "none", "soft_labels": False,
}


class DivergedError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite; the trial stops at once."""


# --------------------------------------------------------------------------- optimizers

def _sgd(params, *, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)


def _adam(params, *, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


def _adamw(params, *, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}


def build_optimizer(name: str, params, *, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """Build the optimizer `name` (SGD uses Nesterov momentum; Adam/AdamW use it as beta1)."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{name}'; choose from {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay, momentum=momentum)


# --------------------------------------------------------------------------- schedules
# One small class instead of torch.optim.lr_scheduler: every schedule here has a
# warm-up, and torch cannot chain a warm-up with ReduceLROnPlateau (SequentialLR
# rejects it). A multiplier computed from (step, plateau scale) composes all of
# them, and its state is three numbers, which makes checkpoints trivial.

def _cosine(t: float, s: "Schedule") -> float:
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _onecycle(t: float, s: "Schedule") -> float:
    # Smith's one-cycle: the warm-up climbs from lr/25 (see Schedule.factor), then cosine to lr/1e4.
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _step(t: float, s: "Schedule") -> float:
    epoch = s.step_count / s.steps_per_epoch
    return s.step_gamma ** int(epoch // max(s.step_epochs, 1))


def _constant(t: float, s: "Schedule") -> float:
    return 1.0


SCHEDULES: dict[str, Callable[[float, "Schedule"], float]] = {
    "cosine": _cosine, "onecycle": _onecycle, "step": _step, "plateau": _constant, "constant": _constant,
}


@dataclass
class Schedule:
    """Per-step learning-rate multiplier with linear warm-up; `plateau` also cuts on stalled PublicTest accuracy."""

    optimizer: torch.optim.Optimizer
    name: str
    epochs: int
    steps_per_epoch: int
    warmup_epochs: float = 0.0
    step_epochs: int = 10
    step_gamma: float = 0.1
    plateau_patience: int = 2
    plateau_factor: float = 0.3
    step_count: int = 0
    plateau_scale: float = 1.0
    best: float = -math.inf
    bad_epochs: int = 0
    base_lrs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise UserError(f"unknown schedule '{self.name}'; choose from {sorted(SCHEDULES)}")
        if not self.base_lrs:
            self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self._apply()

    @property
    def warmup_steps(self) -> int:
        if self.name == "onecycle":  # one-cycle always climbs; 30% of training unless warm-up says otherwise
            frac = self.warmup_epochs / self.epochs if self.warmup_epochs > 0 else 0.3
            return max(1, int(min(max(frac, 0.05), 0.5) * self.total_steps))
        # Capped at half of training: a long warm-up on a short run would never reach the schedule.
        return min(int(self.warmup_epochs * self.steps_per_epoch), self.total_steps // 2)

    @property
    def total_steps(self) -> int:
        return max(1, self.epochs * self.steps_per_epoch)

    def factor(self) -> float:
        """The multiplier on the base learning rate at the current step."""
        w = self.warmup_steps
        if self.step_count < w:
            start = 1 / 25 if self.name == "onecycle" else 0.0
            return start + (1 - start) * (self.step_count + 1) / w
        t = (self.step_count - w) / max(1, self.total_steps - w)
        return SCHEDULES[self.name](t, self) * self.plateau_scale

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step_batch(self) -> None:
        """Advance one optimizer step."""
        self.step_count += 1
        self._apply()

    def step_epoch(self, val_acc: float) -> None:
        """End of an epoch: `plateau` cuts the rate after `plateau_patience` epochs without a new best."""
        if self.name != "plateau":
            return
        if val_acc > self.best + 1e-4:
            self.best, self.bad_epochs = val_acc, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.plateau_patience:
                self.plateau_scale *= self.plateau_factor
                self.bad_epochs = 0
        self._apply()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "plateau_scale": self.plateau_scale, "best": self.best,
                "bad_epochs": self.bad_epochs, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self._apply()


# --------------------------------------------------------------------------- data on the device

@dataclass
class DeviceSplit:
    """A split moved once to the training device: uint8 images and float targets (one-hot or votes)."""

    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def to_device(split: Split, num_classes: int, device: torch.device, *, soft: bool = False) -> DeviceSplit:
    """Move a split to `device`; with `soft` the FER+ vote distribution is the training target."""
    y = split.y.to(device)
    if soft and split.soft is not None:
        target = split.soft.to(device, torch.float32)
    else:
        target = F.one_hot(y, num_classes).float()
    return DeviceSplit(x=split.x.to(device), y=y, target=target)


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA when there is one (with cudnn autotuning), else CPU."""
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    return torch.device("cpu")


def _autocast(device: torch.device):
    # bf16 needs no loss scaling and halves activation memory on recent GPUs; CPU stays fp32.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _prepare(x_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = to_input(x_uint8)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


# --------------------------------------------------------------------------- one epoch

def _loss(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None,
          label_smoothing: float) -> torch.Tensor:
    """Cross-entropy on (soft) targets; with class weights, each sample weighs as much as its label.

    Not `F.cross_entropy(weight=...)`: with probability targets torch weights every class term
    of the sum, so label smoothing's small mass on disgust (weight ~16x happy's) taught every
    sample to predict disgust (PublicTest accuracy 12%). Weighting whole samples by their
    (mixed) label matches the usual weighted loss on hard labels and leaves smoothing alone.
    """
    per_sample = F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="none")
    if class_weights is None:
        return per_sample.mean()
    w = target @ class_weights
    return (per_sample * w).sum() / w.sum()



def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
                    data: DeviceSplit, *, batch_size: int, augment, device: torch.device,
                    label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None,
                    sample_weights: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> dict[str, float]:
    """Train for one pass over `data` (or as many samples drawn by `sample_weights`).

    Batches are sliced from the in-memory uint8 tensor and augmented as a whole on
    the device. Returns mean loss, accuracy and images per second; raises
    `DivergedError` when the loss is not finite.
    """
    model.train()
    n = len(data)
    if sample_weights is not None:  # class-balanced sampling, with replacement
        order = torch.multinomial(sample_weights, n, replacement=True, generator=generator)
    else:
        order = torch.randperm(n, generator=generator)
    order = order.to(data.x.device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        if len(idx) < 2 and i > 0:  # a batch of one breaks BatchNorm; drop the remainder
            break
        x, target = augment(_prepare(data.x[idx], device), data.target[idx])
        with _autocast(device):
            logits = model(normalize(x))
        loss = _loss(logits.float(), target, class_weights, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step_batch()
        loss_sum += loss.detach() * len(idx)
        if (i // batch_size) % 25 == 24 and not torch.isfinite(loss_sum):  # stop soon, but sync rarely
            raise DivergedError(f"training loss became {float(loss_sum)}")
        correct += (logits.argmax(1) == target.argmax(1)).sum()
        seen += len(idx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    mean_loss = float(loss_sum) / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise DivergedError(f"training loss became {mean_loss}")
    return {"train_loss": mean_loss, "train_acc": float(correct) / max(seen, 1),
            "images_per_s": seen / max(elapsed, 1e-9)}


TTA_MODES = ("none", "flip", "tencrop")


def _tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    if mode == "none":
        return [x]
    if mode == "flip":
        return [x, x.flip(-1)]
    if mode == "tencrop":
        # Ten-crop at full size: the reflect-padded image cropped at its four corners and
        # centre (shifts of 4 px, the training crop's range), each also flipped.
        pad = F.pad(x, (4, 4, 4, 4), mode="reflect")
        h, w = x.shape[-2:]
        crops = [pad[..., dy:dy + h, dx:dx + w] for dy, dx in ((0, 0), (0, 8), (8, 0), (8, 8), (4, 4))]
        return crops + [c.flip(-1) for c in crops]
    raise UserError(f"unknown test-time augmentation '{mode}'; choose from {list(TTA_MODES)}")


@torch.no_grad()
def predict(model: nn.Module, x_uint8: torch.Tensor, *, batch_size: int = 512,
            device: torch.device | None = None, tta: str = "none") -> torch.Tensor:
    """Softmax probabilities (N, C) on the CPU, averaged over the test-time views of `tta`."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for i in range(0, len(x_uint8), batch_size):
        x = _prepare(x_uint8[i:i + batch_size].to(device), device)
        probs = None
        views = _tta_views(x, tta)
        for view in views:
            with _autocast(device):
                p = model(normalize(view)).float().softmax(1)
            probs = p if probs is None else probs + p
        out.append((probs / len(views)).cpu())
    return torch.cat(out)


def evaluate(model: nn.Module, data: DeviceSplit, *, batch_size: int = 512,
             tta: str = "none") -> dict[str, float]:
    """Accuracy and cross-entropy loss of `model` on `data` (PublicTest during training)."""
    probs = predict(model, data.x, batch_size=batch_size, tta=tta)
    y = data.y.cpu()
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), y).item()
    return {"val_loss": loss, "val_acc": (probs.argmax(1) == y).float().mean().item()}


# --------------------------------------------------------------------------- a configured run

@dataclass
class Run:
    """Everything one training run needs, built from a config by `build_run`."""

    config: dict
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    augment: Any
    train: DeviceSplit
    val: DeviceSplit
    device: torch.device
    class_weights: torch.Tensor | None
    sample_weights: torch.Tensor | None
    generator: torch.Generator
    epochs: int
    epoch: int = 0
    lr_find: dict | None = None


def resolve_config(config: dict) -> dict:
    """The config with every missing hyperparameter filled from `DEFAULTS`; unknown keys are kept."""
    return {**DEFAULTS, **config}


def model_from_config(config: dict, num_classes: int, *, pretrained: bool | None = None) -> nn.Module:
    """The model a config describes (`pretrained` overrides the config's, e.g. to skip reading ImageNet files)."""
    cfg = resolve_config(config)
    use_weights = bool(cfg["pretrained"]) if pretrained is None else pretrained
    return build_model(cfg["arch"], num_classes=num_classes, stem=cfg["stem"], width=int(cfg["width"]),
                       depth=int(cfg["depth"]), dropout=float(cfg["dropout"]), pretrained=use_weights,
                       input_size=int(cfg["input_size"]))


IMBALANCE = ("none", "weighted_loss", "balanced_sampler")


def _imbalance(mode: str, counts: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Class weights for the loss, or per-sample weights for sampling, for imbalance handling `mode`.

    One choice, not two: weighting the loss *and* sampling classes equally corrects twice,
    and on FER2013 that drove every model to predict disgust (1.5% of Training).
    """
    inverse = counts.sum() / (len(counts) * counts.clamp_min(1).float())
    if mode == "weighted_loss":  # inverse frequency, mean 1, so the loss scale (and the LR) stays comparable
        return inverse / inverse.mean(), None
    if mode == "balanced_sampler":  # each class drawn equally often
        return None, (1.0 / counts.clamp_min(1).float())[y]
    if mode != "none":
        raise UserError(f"unknown imbalance handling '{mode}'; choose from {list(IMBALANCE)}")
    return None, None


def build_run(config: dict, data: FERData, *, epochs: int, device: torch.device | None = None,
              seed: int = 0, state: dict | None = None) -> Run:
    """Turn a hyperparameter config into model, optimizer, schedule, augmentation and device data.

    With `state` (from `run_state`) the run continues where that one stopped; the LR range
    test is not repeated, since the state carries the rate it found.
    """
    cfg = resolve_config(config)
    device = device or pick_device()
    torch.manual_seed(seed)
    nc = data.num_classes
    model = model_from_config(cfg, nc).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    train = to_device(data.train, nc, device, soft=bool(cfg["soft_labels"]))
    val = to_device(data.val, nc, device)
    counts = class_counts(data.train, nc)
    class_weights, sample_weights = _imbalance(cfg["imbalance"], counts, data.train.y)
    class_weights = class_weights.to(device) if class_weights is not None else None
    generator = torch.Generator().manual_seed(seed)
    augment = build_augment(cfg["augment"], magnitude=float(cfg["aug_magnitude"]),
                            mix_alpha=float(cfg["mix_alpha"]), num_classes=nc)
    lr, found = float(cfg["lr"]), None
    if cfg["lr_mode"] == "range_test" and state is None:
        from trainables.lr_find import lr_range_test  # only needed for this mode
        # 100 steps, but no more than about one epoch of this data set: on a small set
        # (a demo, a tiny --train-fraction) the test must not cost more than the training.
        steps = int(min(100, max(30, len(train) // int(cfg["batch_size"]))))
        found = lr_range_test(model, train, optimizer=cfg["optimizer"], batch_size=int(cfg["batch_size"]),
                              weight_decay=float(cfg["weight_decay"]), momentum=float(cfg["momentum"]),
                              augment=augment, device=device, generator=generator, steps=steps)
        lr = found["suggested_lr"]
    elif cfg["lr_mode"] not in ("searched", "range_test"):
        raise UserError(f"unknown lr_mode '{cfg['lr_mode']}'; choose from ['range_test', 'searched']")
    optimizer = build_optimizer(cfg["optimizer"], model.parameters(), lr=lr,
                                weight_decay=float(cfg["weight_decay"]), momentum=float(cfg["momentum"]))
    steps = max(1, math.ceil(len(train) / int(cfg["batch_size"])))
    schedule = Schedule(optimizer, cfg["schedule"], epochs=epochs, steps_per_epoch=steps,
                        warmup_epochs=float(cfg["warmup_epochs"]), step_epochs=int(cfg["step_epochs"]),
                        step_gamma=float(cfg["step_gamma"]), plateau_patience=int(cfg["plateau_patience"]),
                        plateau_factor=float(cfg["plateau_factor"]))
    run = Run(config=cfg, model=model, optimizer=optimizer, schedule=schedule, augment=augment,
              train=train, val=val, device=device, class_weights=class_weights,
              sample_weights=sample_weights, generator=generator, epochs=epochs, lr_find=found)
    if state is not None:
        load_run_state(run, state)
    return run


def run_epoch(run: Run) -> dict[str, float]:
    """Train one epoch, evaluate on PublicTest, advance the schedule; returns the epoch's metrics."""
    cfg = run.config
    set_backbone_frozen(run.model, run.epoch < int(cfg["freeze_epochs"]))
    lr = run.schedule.lr
    metrics = train_one_epoch(run.model, run.optimizer, run.schedule, run.train,
                              batch_size=int(cfg["batch_size"]), augment=run.augment, device=run.device,
                              label_smoothing=float(cfg["label_smoothing"]), class_weights=run.class_weights,
                              sample_weights=run.sample_weights, generator=run.generator)
    metrics.update(evaluate(run.model, run.val))
    run.schedule.step_epoch(metrics["val_acc"])
    run.epoch += 1
    metrics.update({"lr": lr, "epoch": run.epoch})
    return metrics


def run_state(run: Run) -> dict:
    """A checkpointable state: model, optimizer, schedule, epoch and the sampling RNG."""
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "schedule": run.schedule.state_dict(), "epoch": run.epoch,
            "generator": run.generator.get_state(), "config": run.config,
            "found_lr": run.lr_find["suggested_lr"] if run.lr_find else None}


def load_run_state(run: Run, state: dict) -> None:
    """Restore `run` from `run_state` output (loaded with weights_only=True)."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    run.epoch = int(state["epoch"])
    run.generator.set_state(state["generator"])
    if state.get("found_lr") is not None:
        run.lr_find = {"suggested_lr": state["found_lr"]}

"""A configured training run: a `TrialConfig` becomes model, optimizer, schedule, augmentation and data.

`build_run` turns a config into a `Run`; `run_epoch` trains one epoch and evaluates on
PublicTest. With `ema_fraction` the run also keeps an exponential moving average of its
weights (torch's `AveragedModel`, parameters and batch-norm statistics) over that share of the
run, and is judged by it: `val_acc` is the averaged model's and `raw_val_acc` the live
weights'; the weights a run yields (`judged`) are the averaged ones. The average smooths out
the noise of a high learning rate, so a trial judged mid-schedule (at an ASHA rung, while a
one-cycle run is still at its peak) is judged closer to what its annealed end would be.

The Ray trainable and the final stage both drive a `Run`, so what the search
measured is exactly what the final stage retrains. Nothing here imports Ray.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

from trainables.augment import build_augment
from trainables.config import TrialConfig
from trainables.data import FERData, class_counts
from trainables.device import DeviceSplit, fast_training, pick_device, to_device
from trainables.errors import UserError
from trainables.inference import evaluate
from trainables.lr_range import SWEEP, lr_range_test, within_good_rates
from trainables.models import build_model, set_backbone_frozen
from trainables.optim import Schedule, build_optimizer
from trainables.train import train_one_epoch

IMBALANCE = ("none", "weighted_loss", "balanced_sampler")
LR_MODES = ("searched", "range_test")
# The LR range test of a trial costs at most this share of the images the trial trains on before
# it is first judged, with a floor below which the curve is too coarse to read (12 points over
# the 4-4.5 decades a trial sweeps, trainables.lr_range.SWEEP: a point every ~0.35 decade) and a
# ceiling (100 steps, plenty for a smooth curve). At an hour's sizes (30% of Training, first rung
# at epoch 2) that is 53, 26 and 13 steps at batch 32, 64 and 128; batch 256 (6) falls back.
RANGE_TEST_SHARE, RANGE_TEST_MIN_STEPS, RANGE_TEST_MAX_STEPS = 0.10, 12, 100
# The rate used when the budget allows no range test: the usual defaults of each optimizer.
FALLBACK_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}


@dataclass
class Run:
    """Everything one training run needs, built from a config by `build_run`."""

    config: TrialConfig
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
    found_lr: float | None = None  # the LR range test's rate (lr_mode=range_test), else None
    range_test: dict | None = None  # its cost: steps, images, seconds, and why it was skipped
    ema: Any = None  # torch.optim.swa_utils.AveragedModel of `model` (config.ema_fraction > 0), else None

    @property
    def judged(self) -> nn.Module:
        """The model the run is judged by and yields: the averaged weights with EMA, else the live ones."""
        return self.model if self.ema is None else self.ema.module


def _ema_decay(fraction: float, epochs: int, steps_per_epoch: int) -> float:
    """The per-step decay of an EMA whose window (1 / (1 - decay) steps) is `fraction` of the run."""
    return 1.0 - 1.0 / max(1.0, fraction * epochs * steps_per_epoch)


def build_ema(model: nn.Module, decay: float):
    """An EMA of `model`'s parameters and buffers (batch-norm statistics) with per-step `decay`."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def replan(run: "Run", epochs: int) -> None:
    """Make `run` `epochs` long from here on: its schedule and its EMA's window, both shares of the run."""
    run.schedule.replan(epochs)
    run.epochs = epochs
    if run.ema is not None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        run.ema.multi_avg_fn = get_ema_multi_avg_fn(
            _ema_decay(run.config.ema_fraction, epochs, run.schedule.steps_per_epoch))


def model_from_config(config: TrialConfig | Mapping[str, Any], num_classes: int, *,
                      load_imagenet: bool = True) -> nn.Module:
    """The model a config describes; `load_imagenet=False` builds it without reading ImageNet files.

    Weights that are about to be replaced (a saved state_dict) need no ImageNet file, so
    a model trained with `pretrained` can be rebuilt on a machine that lacks it.
    """
    cfg = TrialConfig.of(config)
    return build_model(cfg.arch, num_classes=num_classes, stem=cfg.stem, width=cfg.width, depth=cfg.depth,
                       dropout=cfg.dropout, pretrained=cfg.pretrained and load_imagenet,
                       input_size=cfg.input_size)


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


def affordable_steps(n_train: int, batch_size: int, planned_epochs: int) -> int:
    """Steps of `batch_size` within RANGE_TEST_SHARE of `planned_epochs` over `n_train` images, at most
    RANGE_TEST_MAX_STEPS (before the floor: `plan_range_test` skips fewer than RANGE_TEST_MIN_STEPS)."""
    return int(min(RANGE_TEST_MAX_STEPS, RANGE_TEST_SHARE * n_train * planned_epochs // batch_size))


def plan_range_test(n_train: int, batch_size: int, planned_epochs: int) -> dict:
    """The LR range test a run may afford: at most RANGE_TEST_SHARE of the images it plans to train on.

    `planned_epochs` is what the trial will train before anyone judges it (its first ASHA
    rung, or all its epochs without ASHA). At most RANGE_TEST_MAX_STEPS steps; below
    RANGE_TEST_MIN_STEPS the curve is too coarse to read, so the test is skipped and the
    optimizer's FALLBACK_LR is used. Returns steps (0 when skipped), images, seconds (0 until
    run) and `note` (why it was skipped, else "").
    """
    steps = affordable_steps(n_train, batch_size, planned_epochs)
    if steps < RANGE_TEST_MIN_STEPS:
        return {"steps": 0, "images": 0, "seconds": 0.0,
                "note": f"range test skipped: {RANGE_TEST_SHARE:.0%} of {n_train} images x {planned_epochs} "
                        f"epoch(s) allows {steps} steps of {batch_size}, under {RANGE_TEST_MIN_STEPS}; "
                        f"default rate used"}
    return {"steps": steps, "images": steps * batch_size, "seconds": 0.0, "note": ""}


def build_run(config: TrialConfig | Mapping[str, Any], data: FERData, *, epochs: int,
              device: torch.device | None = None, seed: int = 0, state: dict | None = None,
              range_test_epochs: int | None = None) -> Run:
    """Turn a hyperparameter config into model, optimizer, schedule, augmentation and device data.

    With `state` (from `run_state`) the run continues where that one stopped; the LR range
    test is not repeated, since the state carries the rate it found. The range test's cost
    is bounded by `plan_range_test` over `range_test_epochs` (default: `epochs`).
    """
    cfg = TrialConfig.of(config)
    if cfg.lr_mode not in LR_MODES:
        raise UserError(f"unknown lr_mode '{cfg.lr_mode}'; choose from {sorted(LR_MODES)}")
    device = device or pick_device()
    torch.manual_seed(seed)
    nc = data.num_classes
    model = model_from_config(cfg, nc).to(device)
    if fast_training(device):
        model = model.to(memory_format=torch.channels_last)
    train = to_device(data.train, nc, device, soft=cfg.soft_labels, votes=cfg.ferplus_votes)
    val = to_device(data.val, nc, device)
    class_weights, sample_weights = _imbalance(cfg.imbalance, class_counts(data.train, nc), data.train.y)
    class_weights = class_weights.to(device) if class_weights is not None else None
    generator = torch.Generator().manual_seed(seed)
    augment = build_augment(cfg.augment, magnitude=cfg.aug_magnitude, mix_alpha=cfg.mix_alpha, num_classes=nc)
    lr, found_lr, range_test = cfg.lr, None, None
    if cfg.lr_mode == "range_test" and state is None:
        range_test = plan_range_test(len(train), cfg.batch_size, range_test_epochs or epochs)
        if range_test["steps"]:
            started = time.perf_counter()
            found_lr = lr_range_test(model, train, optimizer=cfg.optimizer, batch_size=cfg.batch_size,
                                     weight_decay=cfg.weight_decay, momentum=cfg.momentum, augment=augment,
                                     device=device, generator=generator, steps=range_test["steps"],
                                     start_lr=SWEEP[cfg.optimizer][0],
                                     end_lr=SWEEP[cfg.optimizer][1])["suggested_lr"]
            found_lr = within_good_rates(cfg.optimizer, found_lr)
            range_test["seconds"] = time.perf_counter() - started
        else:
            found_lr = FALLBACK_LR.get(cfg.optimizer, cfg.lr)
        lr = found_lr
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr=lr, weight_decay=cfg.weight_decay,
                                momentum=cfg.momentum)
    steps_per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))
    schedule = Schedule(optimizer, cfg.schedule, epochs=epochs, steps_per_epoch=steps_per_epoch,
                        warmup_fraction=cfg.warmup_fraction, step_fraction=cfg.step_fraction,
                        step_gamma=cfg.step_gamma, patience_fraction=cfg.patience_fraction,
                        plateau_factor=cfg.plateau_factor)
    if cfg.ema_fraction < 0 or cfg.ema_fraction >= 1:
        raise UserError(f"ema_fraction must be in [0, 1), got {cfg.ema_fraction}")
    ema = build_ema(model, _ema_decay(cfg.ema_fraction, epochs, steps_per_epoch)) if cfg.ema_fraction else None
    run = Run(config=cfg, model=model, optimizer=optimizer, schedule=schedule, augment=augment,
              train=train, val=val, device=device, class_weights=class_weights,
              sample_weights=sample_weights, generator=generator, epochs=epochs, found_lr=found_lr,
              range_test=range_test, ema=ema)
    if state is not None:
        load_run_state(run, state)
    return run


def run_epoch(run: Run) -> dict[str, float]:
    """Train one epoch, evaluate on PublicTest, advance the schedule; returns the epoch's metrics."""
    cfg = run.config
    set_backbone_frozen(run.model, run.epoch < cfg.freeze_epochs)
    lr = run.schedule.lr
    metrics = train_one_epoch(run.model, run.optimizer, run.schedule, run.train, batch_size=cfg.batch_size,
                              augment=run.augment, device=run.device, label_smoothing=cfg.label_smoothing,
                              class_weights=run.class_weights, sample_weights=run.sample_weights,
                              generator=run.generator, ema=run.ema)
    if run.ema is not None:
        live = evaluate(run.model, run.val)
        metrics.update({"raw_val_acc": live["val_acc"], "raw_val_loss": live["val_loss"]})
    metrics.update(evaluate(run.judged, run.val))
    run.schedule.step_epoch(metrics["val_acc"])
    run.epoch += 1
    metrics.update({"lr": lr, "epoch": run.epoch})
    return metrics


def run_state(run: Run) -> dict:
    """A checkpointable state: model, optimizer, schedule, epoch, the found rate and every RNG.

    The batch order comes from `run.generator`; augmentation and dropout draw from torch's
    global generators (CPU, and CUDA where training runs there), so those are saved too: a
    resumed run then draws exactly what the uninterrupted one would have.
    """
    rng = {"cpu": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "schedule": run.schedule.state_dict(), "epoch": run.epoch,
            "generator": run.generator.get_state(), "rng": rng, "config": run.config.to_dict(),
            "found_lr": run.found_lr, "range_test": run.range_test,
            **({"ema": run.ema.state_dict()} if run.ema is not None else {})}


def load_run_state(run: Run, state: dict) -> None:
    """Restore `run` from `run_state` output (loaded with weights_only=True)."""
    run.model.load_state_dict(state["model"])
    if run.ema is not None and "ema" in state:
        run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    run.epoch = int(state["epoch"])
    run.generator.set_state(state["generator"])
    rng = state.get("rng", {})
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and run.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    if state.get("found_lr") is not None:
        run.found_lr = float(state["found_lr"])
    run.range_test = state.get("range_test")

"""The Ray Tune trainable: the only module of `trainables` that talks to Ray.

A plain function of `config`: it types the config once (`TrialConfig`), builds a `Run`
(see `trainables.runner`), resumes
from Ray's checkpoint when there is one, and reports once per epoch with a
checkpoint, so a trial can be paused by ASHA, retried after a crash, or resumed
after the driver was killed.
"""
from __future__ import annotations

import math
import os
import tempfile
import time

import ray
import torch
from ray import tune

from trainables.config import TrialConfig
from trainables.data import FERData
from trainables.runner import build_run, run_epoch, run_state
from trainables.train import DivergedError

CHECKPOINT_FILE = "run.pt"
# Test hooks, so that the failure paths are exercised for real through the CLI:
# FER_INJECT_FAILURE="optimizer=sgd@1;optimizer=adam@1:once" raises at the start of epoch 1
#   (0-based) in trials whose config matches, every time or only the first time;
# FER_INJECT_NAN="optimizer=adamw" turns the weights of matching trials into NaN.
_INJECT_FAILURE = "FER_INJECT_FAILURE"
_INJECT_NAN = "FER_INJECT_NAN"


def _matches(config: dict, spec: str) -> bool:
    key, _, value = spec.partition("=")
    return str(config.get(key)) == value


def _inject_faults(config: dict, epoch: int, run) -> None:
    for spec in filter(None, os.environ.get(_INJECT_FAILURE, "").split(";")):
        cond, _, when = spec.partition("@")
        at, _, mode = when.partition(":")
        if _matches(config, cond) and epoch == int(at or 0):
            marker = os.path.join(tune.get_context().get_trial_dir(), "injected_failure")
            if mode == "once" and os.path.exists(marker):
                continue
            open(marker, "w").close()
            raise RuntimeError(f"injected failure ({spec}) at epoch {epoch}")
    nan = os.environ.get(_INJECT_NAN, "")
    if nan and _matches(config, nan):
        with torch.no_grad():
            for p in run.model.parameters():
                p.fill_(math.nan)


def train_fer(config: dict, *, data: FERData, max_epochs: int, seed: int, threads: int = 1) -> None:
    """Train one trial: report PublicTest metrics and a checkpoint after every epoch."""
    torch.set_num_threads(max(1, threads))
    start = time.perf_counter()
    state, best, last = None, 0.0, {}
    checkpoint = tune.get_checkpoint()
    if checkpoint:  # a retry after a crash, ASHA resuming a paused trial, or --resume
        with checkpoint.as_directory() as path:
            state = torch.load(os.path.join(path, CHECKPOINT_FILE), weights_only=True)
        best, last = float(state["best_val_acc"]), dict(state["metrics"])
        start -= float(state["metrics"]["seconds"])
    run = build_run(TrialConfig.from_dict(config), data, epochs=max_epochs, seed=seed, state=state)
    node = ray.get_runtime_context().get_node_id()
    if run.epoch >= max_epochs:
        # The driver died after this trial's last epoch was saved but before Tune marked it
        # done: report that epoch again so the trial completes with its real result.
        tune.report(last)
        return
    while run.epoch < max_epochs:
        _inject_faults(config, run.epoch, run)
        try:
            metrics = run_epoch(run)
        except DivergedError as err:
            # A finite value keeps Optuna's model sane; `diverged` marks the trial in trials.csv.
            tune.report({"val_acc": best, "best_val_acc": best, "diverged": 1, "error": str(err),
                         "node_id": node, "seconds": time.perf_counter() - start})
            return
        best = max(best, metrics["val_acc"])
        metrics.update({"best_val_acc": best, "diverged": 0, "node_id": node,
                        "seconds": time.perf_counter() - start})
        if run.found_lr is not None:
            metrics["found_lr"] = run.found_lr
        with tempfile.TemporaryDirectory() as tmp:
            state = run_state(run)
            state.update({"best_val_acc": best, "metrics": metrics})
            torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

"""The Ray Tune trainable: the only module of `trainables` that talks to Ray.

A plain function of `config`: it types the config once (`TrialConfig`), builds a `Run`
(see `trainables.runner`), resumes
from Ray's checkpoint when there is one, and reports once per epoch with a
checkpoint, so a trial can be paused by ASHA, retried after a crash, or resumed
after the driver was killed.
"""
from __future__ import annotations

import os
import tempfile
import time

import ray
import torch
from ray import tune

from trainables.config import TrialConfig
from trainables.data import FERData
from trainables.faults import inject_faults
from trainables.runner import build_run, run_epoch, run_state
from trainables.train import DivergedError

CHECKPOINT_FILE = "run.pt"

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
        inject_faults(config, run.epoch, run, tune.get_context().get_trial_dir())
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

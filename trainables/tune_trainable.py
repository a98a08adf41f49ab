"""The Ray Tune trainable: the only module of `trainables` that talks to Ray.

A plain function of `config`: it types the config once (`TrialConfig`), builds a `Run`
(see `trainables.runner`), resumes from Ray's checkpoint when there is one, and reports
once per epoch (with a checkpoint when one is due), so a trial can be retried after a
crash or resumed after the driver was killed.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Sequence

import ray
import torch
from ray import tune

from trainables.config import TrialConfig
from trainables.data import FERData
from trainables.faults import inject_faults
from trainables.inference import evaluate
from trainables.latency import measure_latency
from trainables.memory import check_fits
from trainables.metrics import METRIC
from trainables.runner import build_run, model_from_config, run_epoch, run_state
from trainables.train import DivergedError

CHECKPOINT_FILE = "run.pt"
# A checkpoint is written when it costs at most this share of the training time since the last
# one (every epoch for small models), and always at the epochs in `checkpoint_epochs` (ASHA's
# rungs and the last epoch), so that saving never costs more than a few percent of a trial.
CHECKPOINT_SHARE = 0.02
COST_KEYS = ("params", "latency_ms", "latency_runtime")


def _lr_figures(run) -> dict:
    """The rate a range-tested run trains at, and what its range test cost (for trials.csv)."""
    out = {} if run.found_lr is None else {"found_lr": run.found_lr}
    if run.range_test is not None:
        out.update({f"range_test_{k}": run.range_test[k] for k in ("images", "seconds", "note")})
    return out


def checkpoint_due(epoch: int, save_cost: float | None, unsaved: float, checkpoint_epochs: Sequence[int]) -> bool:
    """Whether to checkpoint after `epoch`: the first time (to learn the cost), at the epochs in
    `checkpoint_epochs`, and whenever saving costs at most CHECKPOINT_SHARE of the `unsaved`
    training seconds since the last checkpoint."""
    return save_cost is None or epoch in checkpoint_epochs or save_cost <= CHECKPOINT_SHARE * unsaved


def trial_folder(trial_root: str | None) -> str:
    """This trial's own folder: `<trial_root>/trial_<id>` (the experiment's, the same for every attempt
    of the trial on any worker process), or Ray's trial directory where no local root is known.

    Not `tune.get_context().get_trial_dir()` alone: Ray gives a trial started in a fresh worker
    its driver staging folder (synced into the experiment) but one started in a reused worker its
    working directory (not synced), so what one attempt wrote there the next attempt did not find.
    """
    if trial_root:
        return os.path.join(trial_root, f"trial_{tune.get_context().get_trial_id()}")
    return tune.get_context().get_trial_dir()


def train_fer(config: dict, *, data: FERData, max_epochs: int, seed: int, threads: int = 1,
              checkpoint_epochs: Sequence[int] = (), range_test_epochs: int | None = None,
              memory_limit: dict[str, float] | None = None, trial_root: str | None = None,
              max_latency_ms: float = 0.0) -> None:
    """Train one trial: report PublicTest metrics after every epoch, with a checkpoint when one is due.

    The search objective (`trainables.metrics.METRIC`) is the best PublicTest accuracy so far;
    a trial whose loss diverges reports the accuracy of the model it diverged to instead, so
    neither ASHA nor Optuna credits it with the accuracy it had before blowing up.

    Everything a trial uses is built here from its arguments (model, data views, generators
    seeded from `seed`, threads, the checkpoint it resumes from), never kept in the worker
    process, so a worker Tune reuses for the next trial (`reuse_actors`) starts it clean.
    `trial_root` is the experiment's local trial folder root (see `trial_folder`). With `max_latency_ms`
    a model slower than that for one face (`trainables.latency`, measured on the built model before
    any training) is not trained: the trial reports the worst objective, 0, with `over_latency` 1 and
    its latency, which the searcher turns into the constraint TPE learns.
    """
    torch.set_num_threads(max(1, threads))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Before any allocation: a trial that cannot fit fails here, with its reason, not by the OOM killer.
    check_fits(config, (memory_limit or {}).get(device), num_classes=data.num_classes, device=device)
    start = time.perf_counter()
    state, best, last = None, 0.0, {}
    checkpoint = tune.get_checkpoint()
    if checkpoint:  # a retry after a crash, or --resume after the driver died
        with checkpoint.as_directory() as path:
            state = torch.load(os.path.join(path, CHECKPOINT_FILE), weights_only=True)
        best, last = float(state["best_val_acc"]), dict(state["metrics"])
        start -= float(state["metrics"]["seconds"])
    cfg = TrialConfig.from_dict(config)
    node = ray.get_runtime_context().get_node_id()
    # What the model costs a user (trials.csv's params, latency_ms, latency_runtime): measured once per trial, on
    # the built model before anything is trained (an LR range test included), and kept in its checkpoint.
    cost = ({k: last[k] for k in COST_KEYS} if all(k in last for k in COST_KEYS)
            else measure_latency(model_from_config(cfg, data.num_classes, load_imagenet=False)))
    if max_latency_ms and cost["latency_ms"] > max_latency_ms:
        tune.report({METRIC: 0.0, "best_val_acc": 0.0, "over_latency": 1, "node_id": node, "diverged": 0,
                     "error": f"{cost['latency_ms']:.2f} ms per face, over --max-latency-ms {max_latency_ms:g}",
                     "seconds": time.perf_counter() - start, **cost})
        return
    run = build_run(cfg, data, epochs=max_epochs, seed=seed, state=state, range_test_epochs=range_test_epochs)
    if run.epoch >= max_epochs:
        # The driver died after this trial's last epoch was saved but before Tune marked it
        # done: report that epoch again so the trial completes with its real result.
        tune.report(last)
        return
    save_cost, unsaved = None, 0.0  # seconds one checkpoint takes; training seconds since the last
    # Where a trial's time goes (benchmarks/overhead.py): setting up (model, data on the device, the
    # LR range test), the epochs themselves (training and PublicTest), and checkpoints.
    timing = {"setup_seconds": time.perf_counter() - start - float(state["metrics"]["seconds"] if state else 0.0),
              "work_seconds": 0.0, "checkpoint_seconds": 0.0}
    while run.epoch < max_epochs:
        inject_faults(config, run.epoch, run, trial_folder(trial_root))
        epoch_start = time.perf_counter()
        try:
            metrics = run_epoch(run)
        except DivergedError as err:
            diverged = evaluate(run.model, run.val)["val_acc"]  # what the trial ended with
            tune.report({METRIC: diverged, "val_acc": diverged, "best_val_acc": best, "diverged": 1,
                         "error": str(err), "node_id": node, "seconds": time.perf_counter() - start,
                         **_lr_figures(run), **cost})
            return
        best = max(best, metrics["val_acc"])
        metrics.update({METRIC: best, "best_val_acc": best, "diverged": 0, "node_id": node,
                        "seconds": time.perf_counter() - start})
        metrics.update(_lr_figures(run))
        metrics.update(cost)
        unsaved += time.perf_counter() - epoch_start
        timing["work_seconds"] += time.perf_counter() - epoch_start
        metrics.update(timing)
        if checkpoint_due(run.epoch, save_cost, unsaved, checkpoint_epochs):
            saving = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                state = run_state(run)
                state.update({"best_val_acc": best, "metrics": metrics})
                torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
            save_cost, unsaved = time.perf_counter() - saving, 0.0
            timing["checkpoint_seconds"] += save_cost
        else:
            tune.report(metrics)

"""Fault injection for the tests: make a matching trial fail, diverge or hang, through the real CLI.

Read from the environment (`search.tuning.cluster` forwards these variables to Ray's workers), so
the failure paths are exercised end to end rather than mocked. Unset, nothing happens.
"""
from __future__ import annotations

import math
import os
import time

import torch

# Test hooks, so that the failure paths are exercised for real through the CLI. Each is a
# ';'-separated list of `<config key>=<value>@<epoch>[:<arg>]` (epoch 0-based, checked at its start):
# FER_INJECT_FAILURE="optimizer=sgd@1;optimizer=adam@1:2" raises in matching trials, every time,
#   or only the first N times (":once" is ":1"), so retries can be counted;
# FER_INJECT_DIVERGE="optimizer=adamw@1:nan;optimizer=sgd@0:inf" makes the training loss NaN
#   (weights set to NaN) or infinite (finite losses whose sum overflows float32);
# FER_INJECT_HANG="optimizer=sgd@1" blocks before that epoch (a trial to kill mid-run);
# FER_INJECT_ALLOC="optimizer=sgd@0:12" allocates and touches that many GiB and holds them for
#   a minute (a trial for Ray's memory monitor to kill).
INJECT_ENV = ("FER_INJECT_FAILURE", "FER_INJECT_DIVERGE", "FER_INJECT_HANG", "FER_INJECT_ALLOC")


def _injections(name: str, config: dict, epoch: int) -> list[tuple[str, str]]:
    """The (spec, arg) pairs of hook `name` that match this trial's config at this epoch."""
    out = []
    for spec in filter(None, os.environ.get(name, "").split(";")):
        cond, _, when = spec.partition("@")
        at, _, arg = when.partition(":")
        key, _, value = cond.partition("=")
        if str(config.get(key)) == value and epoch == int(at or 0):
            out.append((spec, arg))
    return out


def inject_faults(config: dict, epoch: int, run, trial_dir: str) -> None:
    """Apply the hooks that match this trial at the start of `epoch` (no-op when none is set)."""
    for spec, arg in _injections("FER_INJECT_FAILURE", config, epoch):
        os.makedirs(trial_dir, exist_ok=True)
        marker = os.path.join(trial_dir, "injected_failures")  # counts survive retries
        failed = int(open(marker).read() or 0) if os.path.exists(marker) else 0
        limit = 1 if arg == "once" else int(arg) if arg else math.inf
        if failed < limit:
            with open(marker, "w") as f:
                f.write(str(failed + 1))
            raise RuntimeError(f"injected failure ({spec}) at epoch {epoch}")
    for _, arg in _injections("FER_INJECT_DIVERGE", config, epoch):
        with torch.no_grad():
            if arg == "inf":  # each sample's loss (3e38) is finite; the epoch's sum of them is not
                for p in run.model.head.parameters():
                    p.zero_()
                bias = run.model.head[-1].bias
                bias.fill_(-1.5e38)
                bias[0] = 1.5e38
            else:
                for p in run.model.parameters():
                    p.fill_(math.nan)
    if _injections("FER_INJECT_HANG", config, epoch):
        time.sleep(3600)
    for _, arg in _injections("FER_INJECT_ALLOC", config, epoch):
        held = torch.ones(int(float(arg) * 2**30 // 4), dtype=torch.float32)  # ones: every page touched
        time.sleep(60)
        del held

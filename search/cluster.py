"""Ray for every command that needs it: start a local instance or join a cluster, and size a trial.

The search and the final stage share this, so a final run gets the same resources as a
trial and both see the same fault-injection hooks.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from search.settings import Settings
from trainables.errors import UserError
from trainables.faults import INJECT_ENV

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def start_ray(s: Settings) -> dict:
    """Join the cluster at --address, or start a local Ray instance (dashboard off); returns its resources."""
    import ray

    env = {k: os.environ[k] for k in INJECT_ENV if k in os.environ}  # test hooks
    if s.address:
        check_reachable(s.address)
        # Ship this checkout to the cluster so every node runs the driver's code.
        runtime_env = {"working_dir": str(PROJECT_ROOT), "env_vars": env,
                       "excludes": ["results/", ".venv/", ".git/", "data/", "*.cache/"]}
        try:
            ray.init(address=s.address, runtime_env=runtime_env, logging_level="warning")
        except ConnectionError as err:
            raise UserError(f"cannot reach the Ray cluster at {s.address}: {err}") from None
    else:
        ray.init(include_dashboard=False, runtime_env={"env_vars": env} if env else None,
                 logging_level="warning", log_to_driver=True)
    return ray.cluster_resources()


def trial_resources(s: Settings, cluster: dict) -> tuple[dict, int]:
    """Resources of one trial and how many trials run at once."""
    gpus = s.gpus_per_trial
    if gpus < 0:
        gpus = 0.5 if cluster.get("GPU", 0) else 0.0
    if not s.address:  # a cluster's autoscaler may still add nodes; a local machine will not grow
        if gpus > 0 and not cluster.get("GPU", 0):
            raise UserError(f"--gpus-per-trial {gpus} but this machine has no GPU; use --gpus-per-trial 0")
        if s.cpus_per_trial > cluster.get("CPU", 1):
            raise UserError(f"--cpus-per-trial {s.cpus_per_trial} but this machine has "
                            f"{int(cluster.get('CPU', 1))} CPUs")
    fits = max(1, int(cluster.get("CPU", 1) // s.cpus_per_trial))
    if gpus and cluster.get("GPU", 0):
        fits = min(fits, max(1, int(cluster["GPU"] // gpus)))
    concurrent = s.max_concurrent or max(1, min(fits, s.num_samples))
    return {"cpu": s.cpus_per_trial, "gpu": gpus}, concurrent


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast with one line when `host:port` does not answer (ray.init would retry for minutes).

    `auto` (find the cluster this machine belongs to) is left to Ray, which fails at once
    when there is none.
    """
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address must be host:port (e.g. 10.0.0.5:6379) or auto, got '{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise UserError(f"cannot reach the Ray cluster at {address} ({err.strerror or err}); start it with "
                        f"`ray up cluster.yaml`, or leave out --address for a local Ray instance") from None

"""Ray for every command that needs it: start a local instance or join a cluster, and size a trial.

The search and the final stage share this, so a final run gets the same resources as a
trial and both see the same fault-injection hooks.
"""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

from search.tuning.console import ray_quiet
from search.tuning.settings import Settings
from trainables.errors import UserError
from trainables.faults import INJECT_ENV

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT_ENV = "FER_INJECT_MEMORY_LIMIT"  # GiB; see memory_limits
MEMORY_STEP = 2**29  # a trial's host-memory request, in steps of 0.5 GiB (see trial_request)


def start_ray(s: Settings) -> dict:
    """Join the cluster at --address, or start a local Ray instance (dashboard off); returns its resources.

    The workers' output reaches the console only with --verbose (`search.tuning.console.ray_quiet`).
    """
    import ray

    env = {k: os.environ[k] for k in INJECT_ENV if k in os.environ}  # test hooks
    if s.address:
        check_reachable(s.address)
        # Ship this checkout to the cluster so every node runs the driver's code.
        runtime_env = {"working_dir": str(PROJECT_ROOT), "env_vars": env,
                       "excludes": ["results/", ".venv/", ".git/", "data/", "*.cache/"]}
        try:
            ray.init(address=s.address, runtime_env=runtime_env, logging_level="warning", **ray_quiet(s.verbose))
        except ConnectionError as err:
            raise UserError(f"cannot reach the Ray cluster at {s.address}: {err}") from None
    else:
        ray.init(include_dashboard=False, runtime_env={"env_vars": env} if env else None,
                 logging_level="warning", **ray_quiet(s.verbose))
    return ray.cluster_resources()


def check_local_gpus(s: Settings) -> None:
    """Refuse --gpus-per-trial on a local instance when this machine has no GPU, before the data is
    loaded and Ray started (`trial_resources` checks it again against what Ray found)."""
    if not s.address and s.gpus_per_trial > 0:
        import torch

        if not torch.cuda.is_available():
            raise _no_gpu(s.gpus_per_trial)


def _no_gpu(gpus: float) -> UserError:
    return UserError(f"--gpus-per-trial {gpus} but this machine has no GPU; use --gpus-per-trial 0")


def trial_resources(s: Settings, cluster: dict) -> tuple[dict, int]:
    """Resources of one trial and how many trials run at once."""
    gpus = s.gpus_per_trial
    if gpus < 0:
        gpus = 0.5 if cluster.get("GPU", 0) else 0.0
    if not s.address:  # a cluster's autoscaler may still add nodes; a local machine will not grow
        if gpus > 0 and not cluster.get("GPU", 0):
            raise _no_gpu(gpus)
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


def tolerate_lost_workers() -> None:
    """Make a trial whose worker Ray killed (out of memory, a lost node) fail alone, not the search.

    Ray Tune's actor manager (ray 2.60) handles only RayActorError and RayTaskError from a
    trial's actor; the OutOfMemoryError that Ray's memory monitor raises when it kills a
    worker reaches the driver as "Caught unexpected exception" and ends the whole search with
    a traceback. Here any other RayError is passed on as what it means for the trial, the
    death of its actor, so Tune retries the trial under --max-failures and then records it
    as ERROR with the reason. Patched once per process; a no-op if Ray renames the method.
    """
    import ray
    from ray.air.execution._internal import actor_manager

    original = getattr(actor_manager.RayActorManager, "_actor_task_failed", None)
    if original is None or getattr(original, "tolerates_lost_workers", False):
        return

    def task_failed(self, tracked_actor_task, exception):
        handled = (ray.exceptions.RayActorError, ray.exceptions.RayTaskError)
        if isinstance(exception, ray.exceptions.RayError) and not isinstance(exception, handled):
            reason = (str(exception).strip().splitlines() or [type(exception).__name__])[0]
            exception = ray.exceptions.RayActorError(error_msg=f"{type(exception).__name__}: {reason}")
        return original(self, tracked_actor_task, exception)

    task_failed.tolerates_lost_workers = True
    actor_manager.RayActorManager._actor_task_failed = task_failed


def memory_limits(cluster_has_gpu: bool) -> dict[str, float]:
    """What one trial may use at most: the largest live node's `memory` resource and, where this
    machine has a GPU, that card's memory (a cluster's GPU workers are assumed alike)."""
    import ray

    limits = {"cpu": max((n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)}
    if os.environ.get(MEMORY_LIMIT_ENV):  # test hook: pretend the largest node is this small
        limits["cpu"] = min(limits["cpu"], float(os.environ[MEMORY_LIMIT_ENV]) * 2**30)
    if cluster_has_gpu:
        import torch

        if torch.cuda.is_available():
            limits["cuda"] = float(torch.cuda.get_device_properties(0).total_memory)
    return limits


def trial_request(config: dict, *, cpus: int, gpus: float, limits: dict[str, float], num_classes: int):
    """Ray's resource request of one trial: its CPUs, a GPU share that holds its estimated GPU memory
    (at least `gpus`), and its estimated host memory, so that Ray runs fewer trials at once rather
    than overfilling a node. A trial too large for any node asks for at most what the largest has
    (it then fails at once with its reason, see `trainables.memory.check_fits`)."""
    from ray.tune.execution.placement_groups import PlacementGroupFactory

    from trainables.errors import UserError
    from trainables.memory import estimate_memory

    bundle = {"CPU": cpus, "GPU": gpus}
    try:
        host = estimate_memory(config, num_classes, device="cpu" if not gpus else "cuda")["bytes"]
        if gpus and limits.get("cuda"):
            share = host / limits["cuda"]
            bundle["GPU"] = min(1.0, max(gpus, math.ceil(share * 20) / 20))  # in steps of 5% of a card
        elif limits.get("cpu"):
            # Rounded up to MEMORY_STEP so that similar trials ask for the same bundle: Tune reuses a
            # finished trial's worker process only for a trial with the same request.
            bundle["memory"] = min(math.ceil(host / MEMORY_STEP) * MEMORY_STEP, limits["cpu"])
    except UserError:  # a config the trial itself will reject, with its message
        pass
    return PlacementGroupFactory([{k: v for k, v in bundle.items() if v}])

"""Retraining the chosen configurations from scratch: plain-PyTorch `retrain`, run as parallel Ray tasks.

The data rule lives here too: the final stage loads all three splits, but a retraining
task is handed only Training and PublicTest (`without_test`); PrivateTest is scored once,
by the driver, after every task has finished.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from search.final_stage.candidates import Candidate
from search.tuning.cluster import memory_limits, start_ray, trial_request, trial_resources
from search.tuning.console import ProgressBox, RunBars, Sender, counted, show_progress
from search.tuning.settings import Settings
from trainables.calibration import fit_temperature
from trainables.config import TrialConfig
from trainables.data import SEARCH_SPLITS, SPLITS, FERData, load_fer2013
from trainables.errors import UserError
from trainables.inference import TTA_MODES, predict
from trainables.runner import build_run, replan, run_epoch
from trainables.train import DivergedError
from trainables.weights import save_weights


def run_name(config: str, seed: int) -> str:
    """A final run's name: its configuration's name and seed (the stem of its weights file, its rows' key)."""
    return f"{config}-seed{seed}"


@dataclass
class FinalRun:
    """One retrained (configuration, seed): its weights file, best PublicTest epoch and PublicTest probabilities."""

    candidate: Candidate
    seed: int
    weights: Path
    best_epoch: int
    val_acc: float
    val_probs: dict[str, np.ndarray]  # per TTA mode, of the kept weights
    # Cut by the deadline before its schedule ended (never annealed): kept and marked in metrics.csv,
    # left out of the ensembles and the seed means while any run finished its schedule.
    truncated: bool = False

    @property
    def name(self) -> str:
        return run_name(self.candidate.name, self.seed)

    @property
    def lr(self) -> float:
        """The learning rate it trained at (a range-tested trial's found rate)."""
        return self.candidate.config.lr


# --------------------------------------------------------------------------- data (the protocol)

def load_final_data(s: Settings) -> FERData:
    """All three splits, with the FULL Training split (the search's --train-fraction does not apply here), and
    their FER+ votes where there are any (FER2013 labels): a configuration may train on them, and the stage
    audits its labels with them."""
    return load_fer2013(s.data, splits=SPLITS, labels=s.labels, ferplus_path=s.ferplus or None, seed=s.seed,
                        votes=True)


def without_test(data: FERData) -> FERData:
    """What a retraining task may see: Training and PublicTest, never PrivateTest."""
    return FERData(classes=data.classes, splits={k: data.splits[k] for k in SEARCH_SPLITS}, source=data.source)


# --------------------------------------------------------------------------- one run (inside a Ray task)

def write_scalars(tensorboard_dir: str | Path, history: Sequence[dict]) -> None:
    """Write per-epoch scalars of a run as TensorBoard events (used where the task could not write them here)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tensorboard_dir)) as writer:
        for metrics in history:
            _add_scalars(writer, metrics)


def _add_scalars(writer, metrics: dict) -> None:
    """One epoch's metrics as TensorBoard scalars, at that epoch."""
    for key, value in metrics.items():
        if key != "epoch":
            writer.add_scalar(key, value, int(metrics["epoch"]))


def _open_writer(tensorboard_dir: str | None):
    from torch.utils.tensorboard import SummaryWriter

    if not tensorboard_dir:
        return None
    try:
        return SummaryWriter(tensorboard_dir)
    except OSError:  # a cluster node that cannot write the driver's results path: the driver writes them
        return None


def retrain(config: TrialConfig, data: FERData, *, epochs: int, seed: int, threads: int = 1,
            tensorboard_dir: str | None = None, label: str = "", ttas: Sequence[str] = TTA_MODES,
            deadline: float | None = None, progress: Callable[[dict], None] | None = None,
            init_state: dict | None = None) -> dict:
    """Train `config` from scratch (or from `init_state`) for `epochs`, keeping the weights of its best
    PublicTest epoch.

    Plain PyTorch (the final stage runs it as a Ray task). Returns the best epoch's
    state_dict on the CPU, that epoch's number and PublicTest accuracy, the per-epoch
    history, `diverged` (the error, or "") if the loss stopped being finite, and
    `val_probs`: the kept weights' PublicTest probabilities per TTA mode (computed
    here, in parallel, because PublicTest is the task's to read; PrivateTest is not).
    A run that diverges in its first epoch returns `state_dict` None. `trained_on` names
    the splits it was handed; being handed PrivateTest is refused (a bug, not a user error).
    With `deadline` (a `time.time()` value, from --time-budget) a run that starts after it trains
    nothing (`not_started`); after each epoch, when the planned epochs no longer fit at the measured
    epoch time, the run is re-planned to the epochs that do (`planned_epochs`), and its schedule,
    whose settings are fractions of the run, still warms up and anneals over that shorter run. A
    run that still meets the deadline stops after the last epoch that ends before it, mid-schedule:
    `stopped_early` says so. `progress` is sent each epoch (`{"run", "epoch", "epochs", "val_acc"}`) and
    each note (`{"run", "note"}`) as it happens (the final stage shows them on the driver's console); by
    default they are printed. `init_state` (a state_dict of the same model) starts the run from those
    weights: the distilled student starts from the best run's.
    """
    tell = progress or _print_progress
    if set(data.splits) - set(SEARCH_SPLITS):
        raise ValueError(f"a retraining run may see only {SEARCH_SPLITS}, got {sorted(data.splits)}")
    best: dict = {"state_dict": None, "best_epoch": 0, "val_acc": float("nan")}
    if deadline and time.time() >= deadline:
        tell({"run": label, "note": f"{label} not started: the time budget has ended"})
        return {**best, "history": [], "diverged": "", "val_probs": {}, "trained_on": sorted(data.splits),
                "stopped_early": False, "not_started": True, "planned_epochs": 0}
    torch.set_num_threads(max(1, threads))
    run = build_run(config, data, epochs=epochs, seed=seed)
    if init_state is not None:
        run.model.load_state_dict(init_state)
        if run.ema is not None:
            run.ema.module.load_state_dict(init_state)
    writer = _open_writer(tensorboard_dir)
    history, diverged, stopped_early, epoch_seconds = [], "", False, 0.0
    try:
        while run.epoch < epochs:
            if deadline and history:
                fit = run.epoch + int(max(0.0, deadline - time.time()) // max(epoch_seconds, 1e-6))
                if run.epoch < fit < epochs:
                    tell({"run": label, "note": f"{label} re-planned from {epochs} to {fit} epochs: the time budget "
                                                f"fits no more at {epoch_seconds:.1f} s per epoch (the schedule "
                                                f"anneals over the shorter run)"})
                    epochs = fit
                    replan(run, fit)
                elif fit <= run.epoch:
                    stopped_early = True
                    tell({"run": label, "note": f"{label} stopped after epoch {run.epoch}/{epochs}: the next "
                                                f"would end after the time budget"})
                    break
            epoch_start = time.time()
            try:
                metrics = run_epoch(run)
            except DivergedError as err:
                diverged = str(err)
                break
            history.append(metrics)
            epoch_seconds = time.time() - epoch_start
            if writer:
                _add_scalars(writer, metrics)
                writer.flush()
            # Strictly better only: on a tie the earlier (less trained) epoch is kept.
            if best["state_dict"] is None or metrics["val_acc"] > best["val_acc"]:
                state = {k: v.detach().to("cpu", copy=True) for k, v in run.judged.state_dict().items()}
                best = {"state_dict": state, "best_epoch": run.epoch, "val_acc": float(metrics["val_acc"])}
            tell({"run": label, "epoch": run.epoch, "epochs": epochs, "val_acc": float(metrics["val_acc"])})
    finally:
        if writer:
            writer.close()
    val_probs = {}
    if best["state_dict"] is not None:
        run.judged.load_state_dict(best["state_dict"])
        val_probs = {tta: predict(run.judged, run.val.x, device=run.device, tta=tta).numpy() for tta in ttas}
    return {**best, "history": history, "diverged": diverged, "val_probs": val_probs,
            "trained_on": sorted(data.splits), "stopped_early": stopped_early, "not_started": False,
            "planned_epochs": epochs}


def _print_progress(event: dict) -> None:
    """`retrain`'s progress where nobody collects it: one line per epoch or note."""
    if "epoch" in event:
        print(f"{event['run']} epoch {event['epoch']}/{event['epochs']}: PublicTest accuracy "
              f"{event['val_acc']:.4f}", flush=True)
    else:
        print(event["note"], flush=True)


# --------------------------------------------------------------------------- every run, in parallel

def _get(ref):
    """ray.get, turning a UserError raised inside a task back into itself (one line, not Ray's traceback)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(getattr(err, "cause", None), UserError):
            raise UserError(str(err.cause)) from None
        raise


def retrain_all(s: Settings, data: FERData, candidates: Sequence[Candidate], *, epochs: int,
                out: Path, ttas: Sequence[str] = TTA_MODES, deadline: float | None = None,
                seeds: Sequence[int] | None = None, init_state: dict | None = None, cpus: int = 0,
                info: dict | None = None) -> list[FinalRun]:
    """Retrain every candidate with every seed (default `seeds_of(s)`) as parallel Ray tasks; save the weights.

    Each task asks for what a trial of its configuration asked for (`task_options`): the CPUs,
    a GPU share that holds its estimated memory and its host memory, so that two large
    configurations the search ran one per GPU do not share a card here.
    `deadline` (a `time.time()` value) is when every run must have finished training. The distilled
    student is one more call: `init_state` (the weights it starts from), `cpus` (a run alone may use
    every CPU the runs had: -1; 0 keeps a trial's) and `info` (recorded in its weights file).
    """
    import ray

    with ray_for(s):  # started (and shut down) here unless the caller already holds it
        cluster = ray.cluster_resources()
        pending: list = []
        bars, box = RunBars(live=False if s.verbose else None), None
        try:
            resources, slots = trial_resources(s, cluster)
            if cpus < 0:  # a run alone: every CPU the runs had at once, on one node (a GPU run keeps a trial's)
                cpus = 0 if resources["gpu"] else alone_cpus(resources["cpu"] * slots)
            limits = memory_limits(bool(resources["gpu"]))
            task = ray.remote(retrain_task)
            data_ref = ray.put(without_test(data))
            # The runs' epochs and notes reach the driver through an actor that takes no CPU from the
            # runs, so they are shown here whether or not the workers' output is.
            box = ray.remote(num_cpus=0)(ProgressBox).remote()  # in a light module: the actor imports no torch
            jobs = {}
            seeds = list(seeds_of(s) if seeds is None else seeds)
            for cand in candidates:
                options = task_options(cand.config, resources, limits, data.num_classes)
                if cpus:
                    options["num_cpus"] = cpus
                for seed in seeds:
                    name = run_name(cand.name, seed)
                    board = (out / "tensorboard" / name).resolve()
                    ref = task.options(**options).remote(cand.config, data_ref, epochs=epochs, seed=seed,
                                                         threads=cpus or s.cpus_per_trial, tensorboard_dir=str(board),
                                                         label=name, ttas=list(ttas), deadline=deadline,
                                                         progress=Sender(box), init_state=init_state)
                    jobs[ref] = (cand, seed, board)
            if init_state is None:
                bars.note(f"final stage: retraining {counted(len(candidates), 'configuration')} x "
                          f"{counted(len(seeds), 'seed')} for {counted(epochs, 'epoch')} on {len(data.train)} "
                          f"Training images ({resources['cpu']} CPU, {resources['gpu']} GPU each)")
            runs, pending = [], list(jobs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=REFRESH_SECONDS)
                _show_sent(box, bars)
                if not done:
                    continue
                cand, seed, board = jobs[done[0]]
                result = _get(done[0])
                _show_sent(box, bars)  # the run's last epochs, before its result line
                run = save_run(result, cand, seed, s, data, out, board, say=bars.note, extra=info)
                if run:
                    runs.append(run)
                    bars.note(f"final run {run.name}: best PublicTest accuracy {run.val_acc:.4f} at epoch "
                              f"{run.best_epoch} ({len(jobs) - len(pending)}/{len(jobs)} done)")
        except BaseException:
            for ref in pending:  # a failed run or Ctrl-C: do not leave the others training on a shared cluster
                ray.cancel(ref, force=True)
            raise
        finally:
            bars.close()
            if box is not None:
                ray.kill(box)
        return sorted(runs, key=lambda r: (r.candidate.rank, r.seed))


REFRESH_SECONDS = 0.5  # how often the driver shows the runs' progress


@contextlib.contextmanager
def ray_for(s: Settings):
    """Ray for the final stage's tasks: joined or started here when it is not running yet (search.run has already
    started it), and shut down after only when started here, so a caller that holds it (the stage, for its runs
    and then the student) starts it once."""
    import ray

    started = not ray.is_initialized()
    if started:
        start_ray(s)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def alone_cpus(wanted: int) -> int:
    """`wanted` CPUs for one task, at most what the largest live node of the Ray cluster has."""
    import ray

    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    return int(max(1, min(wanted, largest)))


def retrain_task(*args, progress: Sender, **kwargs) -> dict:
    """`retrain` as the final stage's Ray task: every progress event it sent has reached the box when it
    returns, so the driver shows a run's last epochs before its result."""
    try:
        return retrain(*args, progress=progress, **kwargs)
    finally:
        progress.flush()


def _show_sent(box, bars: RunBars) -> None:
    """Show every progress event the runs have sent since the last call."""
    import ray

    for event in ray.get(box.take.remote()):
        show_progress(event, bars)


def task_options(config: TrialConfig, resources: dict, limits: dict[str, float], num_classes: int) -> dict:
    """The Ray task options of one final run: the resource request a trial of `config` gets
    (`search.tuning.cluster.trial_request`), as num_cpus, num_gpus and memory."""
    bundle = trial_request(config.to_dict(), cpus=resources["cpu"], gpus=resources["gpu"], limits=limits,
                           num_classes=num_classes).bundles[0]
    options = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0)}
    if bundle.get("memory"):
        options["memory"] = int(bundle["memory"])
    return options


def seeds_of(s: Settings) -> list[int]:
    """The seeds of the final runs: --seed+1, --seed+2, ... never the search's own --seed.

    With the search's seed (and --train-fraction 1) the first final run would replay the very
    trial that was chosen for its PublicTest score, and inherit that selection's luck.
    """
    return [s.seed + 1 + i for i in range(s.final_seeds)]


def save_run(result: dict, cand: Candidate, seed: int, s: Settings, data: FERData, out: Path,
             board: Path, say: Callable[[str], None] = print, extra: dict | None = None) -> FinalRun | None:
    """Write a finished task's best weights (+ config JSON, with `extra` added) and make sure its TensorBoard
    scalars exist here; `say` shows why a run was left out."""
    name = run_name(cand.name, seed)
    if result["history"] and not any(board.glob("events.out.tfevents.*")):
        write_scalars(board, result["history"])  # the task ran on another node, whose disk we cannot see
    if result["not_started"]:
        say(f"final run {name}: not started, the time budget had ended; left out")
        return None
    if result["state_dict"] is None:
        say(f"final run {name}: diverged in its first epoch ({result['diverged']}); left out")
        return None
    info = {"name": name, "trial_id": cand.trial_id, "seed": seed, "best_epoch": result["best_epoch"],
            "val_acc": result["val_acc"], "search_val_acc": cand.search_val_acc, "labels": s.labels,
            "experiment": s.name, "data_seed": s.seed, "diverged": result["diverged"], "history": result["history"],
            "trained_on": result["trained_on"], "planned_epochs": result["planned_epochs"],
            "truncated": result["stopped_early"],
            # fitted on PublicTest without TTA, as search.predict and the exported models classify
            "temperature": fit_temperature(result["val_probs"]["none"], data.val.y.numpy()), **(extra or {})}
    path = save_weights(out / "models" / name, result["state_dict"], config=cand.config, classes=data.classes,
                        info=info)
    return FinalRun(candidate=cand, seed=seed, weights=path, best_epoch=int(result["best_epoch"]),
                    val_acc=float(result["val_acc"]), val_probs=result["val_probs"],
                    truncated=result["stopped_early"])

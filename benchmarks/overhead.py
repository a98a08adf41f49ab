"""What the search machinery costs: the share of a search's wall time spent outside training epochs.

`python benchmarks/overhead.py [--data PATH]` runs, on real FER2013:

1. a small real search, with and without reusing trial processes (--trials trials of
   --epochs epochs on --train-fraction of Training, random searcher, no early stopping,
   as many trials at once as there are cores), and
   splits its wall time: Ray's start, each trial's set-up (model, data on the device),
   its epochs (training and PublicTest evaluation: the work), its checkpoints, and the rest
   (Tune's trial start, scheduling, reporting, the hand-off of the data);
2. the same trials (the configurations the search drew) as plain PyTorch loops, one
   process per slot with no Ray, Tune or Optuna: the wall time the same work takes without
   the machinery;
3. a trainable that does no work (reports --epochs times and returns): trials per minute
   through Tune, i.e. the fixed cost per trial.

The overhead share is 1 - (sum of epoch seconds) / (wall seconds x slots); the search's rows
also split its machinery's slot-seconds by where they go (Tuner build, Tune's start, each
trial's start, reporting, scheduling gaps, Tune's end; see `Timeline.breakdown`). Writes
`results/benchmarks/overhead.csv` and `overhead.png` (where each run's slot-seconds go).
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray.tune import Callback  # noqa: E402

from search.run import build_tuner, load_search_data  # noqa: E402
from search.tuning.callbacks import SearchConsole, TrialsCsvWriter  # noqa: E402
from search.tuning.cluster import start_ray, tolerate_lost_workers, trial_resources  # noqa: E402
from search.tuning.console import Console  # noqa: E402
from search.tuning.settings import parse_settings  # noqa: E402
from trainables.files import write_csv  # noqa: E402

_DATA = {}


class Timeline(Callback):
    """When each trial started, reported and completed, as the driver saw it (time.perf_counter())."""

    def __init__(self) -> None:
        self.starts, self.results, self.completes = {}, {}, {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.starts[trial.trial_id] = time.perf_counter()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.results.setdefault(trial.trial_id, []).append((time.perf_counter(), dict(result)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completes[trial.trial_id] = time.perf_counter()

    def breakdown(self, fit_start: float, fit_end: float, slots: int) -> dict:
        """Slot-seconds of the search's machinery, by where they go.

        tune_start: fit() until the first trial starts (per slot); trial_start: a trial's start until
        its first report, less what the trainable itself measured (set-up, first epoch, checkpoint);
        reporting: between two reports of a trial, less its epoch and checkpoint; scheduling: a slot
        idle between one trial's completion and the next trial's start; tune_end: the last
        completion until fit() returns (per slot).
        """
        out = {"tune_start_s": (min(self.starts.values()) - fit_start) * slots, "trial_start_s": 0.0,
               "reporting_s": 0.0, "scheduling_s": 0.0,
               "tune_end_s": (fit_end - max(self.completes.values(), default=fit_end)) * slots}
        for tid, rows in self.results.items():
            prev_t, prev = self.starts[tid], {"work_seconds": 0.0, "checkpoint_seconds": 0.0, "setup_seconds": 0.0}
            for t, r in rows:
                inside = sum(r.get(k, 0.0) - prev.get(k, 0.0) for k in ("work_seconds", "checkpoint_seconds",
                                                                         "setup_seconds"))
                key = "trial_start_s" if prev_t == self.starts[tid] else "reporting_s"
                out[key] += max(0.0, (t - prev_t) - inside)
                prev_t, prev = t, r
        ordered = sorted(self.starts.items(), key=lambda kv: kv[1])[slots:]
        for _tid, started in ordered:  # a slot freed by the latest completion before this start
            before = [c for c in self.completes.values() if c <= started]
            out["scheduling_s"] += started - max(before) if before else 0.0
        return out


def _init_worker(data) -> None:
    import torch

    torch.set_num_threads(1)
    _DATA["data"] = data


def _plain_trial(args) -> dict:
    """One trial as a plain loop: build the run, train and evaluate `epochs` epochs."""
    from trainables.runner import build_run, run_epoch

    config, epochs, seed = args
    start = time.perf_counter()
    run = build_run(config, _DATA["data"], epochs=epochs, seed=seed)
    setup = time.perf_counter() - start
    work_start = time.perf_counter()
    for _ in range(epochs):
        run_epoch(run)
    return {"setup_seconds": setup, "work_seconds": time.perf_counter() - work_start}


def _no_work(config: dict) -> None:
    from ray import tune

    for epoch in range(config["epochs"]):
        tune.report({"objective": 0.0, "epoch": epoch + 1})


def search_part(a, results: Path, *, reuse: bool, ray_start: float, cluster: dict) -> tuple[dict, list[dict]]:
    s = parse_settings(["--space", "convnet", "--data", a.data, "--train-fraction", str(a.train_fraction),
                        "--max-epochs", str(a.epochs), "--grace-epochs", str(a.epochs), "--scheduler", "fifo",
                        "--searcher", "random", "--num-samples", str(a.trials), "--seed", str(a.seed),
                        "--no-known-good", "--no-final", "--results", str(results), "--name", f"reuse-{reuse}"])
    data = load_search_data(s)  # the same for both parts: not counted
    resources, slots = trial_resources(s, cluster)
    timeline = Timeline()
    # What search.run adds besides: its console (printed to memory here, to keep the table readable).
    watch = SearchConsole(Console(io.StringIO(), live=False), max_epochs=s.max_epochs, rungs=[],
                          num_samples=s.num_samples)
    started = time.perf_counter()
    tuner = build_tuner(s, data, s.experiment_dir, resources, slots, TrialsCsvWriter(s.experiment_dir, s.max_epochs),
                        reuse_actors=reuse, callbacks=[timeline, watch])
    fit_start = time.perf_counter()
    grid = tuner.fit()
    fit_end = time.perf_counter()
    wall = fit_end - started + ray_start  # Ray's start counts against every search
    last = [r.metrics for r in grid if r.metrics]
    configs = [r.config for r in grid if r.metrics]
    work = sum(m["work_seconds"] for m in last)
    setup = sum(m["setup_seconds"] for m in last)
    ckpt = sum(m["checkpoint_seconds"] for m in last)
    row = {"part": f"search: Ray Tune + Optuna + our trainable (reuse_actors={reuse})", "trials": len(last),
           "slots": slots, "wall_s": wall, "ray_start_s": ray_start, "setup_s": setup, "work_s": work,
           "checkpoint_s": ckpt, "other_s": wall * slots - work - setup - ckpt - ray_start * slots,
           "overhead_share": 1 - work / (wall * slots), "trials_per_min": 60 * len(last) / wall,
           "tuner_build_s": (fit_start - started) * slots, **timeline.breakdown(fit_start, fit_end, slots)}
    return row, configs


def plain_part(a, configs: list[dict], data, slots: int) -> dict:
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(slots, initializer=_init_worker, initargs=(data,)) as pool:
        out = pool.map(_plain_trial, [(c, a.epochs, a.seed) for c in configs], chunksize=1)
    wall = time.perf_counter() - started
    work = sum(o["work_seconds"] for o in out)
    setup = sum(o["setup_seconds"] for o in out)
    return {"part": "the same trials as plain loops (one process per slot)", "trials": len(out), "slots": slots,
            "wall_s": wall, "ray_start_s": 0.0, "setup_s": setup, "work_s": work, "checkpoint_s": 0.0,
            "other_s": wall * slots - work - setup, "overhead_share": 1 - work / (wall * slots),
            "trials_per_min": 60 * len(out) / wall}


def no_work_part(a, slots: int, reuse: bool) -> dict:
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        tuner = tune.Tuner(tune.with_resources(_no_work, {"cpu": 1}), param_space={"epochs": a.epochs},
                           tune_config=tune.TuneConfig(num_samples=a.no_work_trials, reuse_actors=reuse),
                           run_config=tune.RunConfig(storage_path=tmp, name="no_work", verbose=0))
        tuner.fit()
        wall = time.perf_counter() - started
    return {"part": f"no-work trainable through Tune (reuse_actors={reuse})", "trials": a.no_work_trials,
            "slots": slots, "wall_s": wall, "overhead_share": 1.0, "trials_per_min": 60 * a.no_work_trials / wall,
            "seconds_per_trial_slot": wall * slots / a.no_work_trials}


def plot(df: pd.DataFrame, path: Path) -> None:
    """Where each run's slot-seconds go, one stacked bar per run (plain loops, the two searches)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = {"training epochs": df["work_s"], "trial set-up": df["setup_s"], "checkpoints": df["checkpoint_s"],
             "Ray start": df["ray_start_s"] * df["slots"], "the rest (starts, scheduling, idle)": df["other_s"]}
    fig, ax = plt.subplots(figsize=(10, 3.2))
    left = pd.Series(0.0, index=df.index)
    for label, values in parts.items():
        ax.barh(df["part"], values.fillna(0.0), left=left, label=label)
        left += values.fillna(0.0)
    ax.set_xlabel("slot-seconds (wall seconds x trials at once)")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Where a small search's time goes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/fer2013.csv", help="fer2013.csv or a Kaggle image folder")
    p.add_argument("--train-fraction", type=float, default=0.25, help="share of Training per trial (default 0.25)")
    p.add_argument("--trials", type=int, default=8, help="trials of the search (default 8)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (default 2)")
    p.add_argument("--no-work-trials", type=int, default=20, help="trials of the no-work trainable (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/benchmarks/overhead.csv")
    a = p.parse_args()
    import ray

    probe = parse_settings(["--space", "convnet", "--data", a.data, "--train-fraction", str(a.train_fraction),
                            "--seed", str(a.seed), "--no-final", "--name", "probe"])
    data = load_search_data(probe)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        cluster = start_ray(probe)
        tolerate_lost_workers()
        ray_start = time.perf_counter() - started
        try:
            searches = [search_part(a, Path(tmp), reuse=reuse, ray_start=ray_start, cluster=cluster)
                        for reuse in (True, False)]
            slots = searches[0][0]["slots"]
            rows = [row for row, _ in searches]
            rows += [no_work_part(a, slots, reuse=False), no_work_part(a, slots, reuse=True)]
        finally:
            ray.shutdown()
    search, configs = searches[0]
    rows.insert(0, plain_part(a, configs, data, slots))
    df = pd.DataFrame(rows)
    df["wall_vs_plain"] = df["wall_s"] / rows[0]["wall_s"]
    write_csv(df, a.out)
    plot(df.iloc[:3], Path(a.out).with_suffix(".png"))
    pd.set_option("display.width", 250)
    print(df.to_string(index=False, float_format=lambda v: f"{v:,.3f}"))
    print(f"\noverhead of the search: {100 * search['overhead_share']:.1f}% of its wall time x slots outside "
          f"training epochs ({100 * searches[1][0]['overhead_share']:.1f}% without reusing worker processes; "
          f"plain loops: {100 * rows[0]['overhead_share']:.1f}%); the search took "
          f"{search['wall_s'] / rows[0]['wall_s']:.2f}x the plain loops' wall time. wrote {a.out}")


if __name__ == "__main__":
    main()

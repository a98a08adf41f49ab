"""What the search machinery costs: the share of a search's wall time spent outside training epochs.

`python benchmarks/overhead.py [--data PATH]` runs, on real FER2013:

1. a small real search (--trials trials of --epochs epochs on --train-fraction of Training,
   random searcher, no early stopping, as many trials at once as there are cores) and
   splits its wall time: Ray's start, each trial's set-up (model, data on the device),
   its epochs (training and PublicTest evaluation: the work), its checkpoints, and the rest
   (Tune's trial start, scheduling, reporting, the hand-off of the data);
2. the same trials (the configurations the search drew) as plain PyTorch loops, one
   process per slot with no Ray, Tune or Optuna: the wall time the same work takes without
   the machinery;
3. a trainable that does no work (reports --epochs times and returns): trials per minute
   through Tune, i.e. the fixed cost per trial.

The overhead share is 1 - (sum of epoch seconds) / (wall seconds x slots). Writes
`results/benchmarks/overhead.csv`.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search.cluster import start_ray, tolerate_lost_workers, trial_resources  # noqa: E402
from search.run import build_tuner, load_search_data  # noqa: E402
from search.settings import parse_settings  # noqa: E402
from search.tune_callbacks import TrialsCsvWriter  # noqa: E402
from trainables.files import write_csv  # noqa: E402

_DATA = {}


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


def search_part(a, results: Path) -> tuple[dict, list[dict], object]:
    s = parse_settings(["--space", "convnet", "--data", a.data, "--train-fraction", str(a.train_fraction),
                        "--max-epochs", str(a.epochs), "--grace-epochs", str(a.epochs), "--scheduler", "fifo",
                        "--searcher", "random", "--num-samples", str(a.trials), "--seed", str(a.seed),
                        "--no-known-good", "--no-final", "--results", str(results), "--name", "overhead"])
    data = load_search_data(s)  # the same for both parts: not counted
    started = time.perf_counter()
    cluster = start_ray(s)
    tolerate_lost_workers()
    ray_start = time.perf_counter() - started
    resources, slots = trial_resources(s, cluster)
    tuner = build_tuner(s, data, s.experiment_dir, resources, slots, TrialsCsvWriter(s.experiment_dir, s.max_epochs))
    grid = tuner.fit()
    wall = time.perf_counter() - started
    last = [r.metrics for r in grid if r.metrics]
    configs = [r.config for r in grid if r.metrics]
    work = sum(m["work_seconds"] for m in last)
    setup = sum(m["setup_seconds"] for m in last)
    ckpt = sum(m["checkpoint_seconds"] for m in last)
    row = {"part": "search (Ray Tune + Optuna + our trainable)", "trials": len(last), "slots": slots,
           "wall_s": wall, "ray_start_s": ray_start, "setup_s": setup, "work_s": work, "checkpoint_s": ckpt,
           "other_s": wall * slots - work - setup - ckpt - ray_start * slots,
           "overhead_share": 1 - work / (wall * slots), "trials_per_min": 60 * len(last) / wall}
    return row, configs, data


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

    with tempfile.TemporaryDirectory() as tmp:
        try:
            search, configs, data = search_part(a, Path(tmp))
            slots = search["slots"]
            rows = [search, no_work_part(a, slots, reuse=False), no_work_part(a, slots, reuse=True)]
        finally:
            ray.shutdown()
    rows.insert(1, plain_part(a, configs, data, slots))
    df = pd.DataFrame(rows)
    df["wall_vs_plain"] = df["wall_s"] / rows[1]["wall_s"]
    write_csv(df, a.out)
    pd.set_option("display.width", 250)
    print(df.to_string(index=False, float_format=lambda v: f"{v:,.3f}"))
    print(f"\noverhead of the search: {100 * search['overhead_share']:.1f}% of its wall time x slots outside "
          f"training epochs (plain loops: {100 * rows[1]['overhead_share']:.1f}%); the search took "
          f"{search['wall_s'] / rows[1]['wall_s']:.2f}x the plain loops' wall time. wrote {a.out}")


if __name__ == "__main__":
    main()

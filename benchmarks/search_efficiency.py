"""Does the search pay? Best PublicTest accuracy against compute for four search methods at equal compute.

`python benchmarks/search_efficiency.py [--data PATH]` runs, on real FER2013 and the
`convnet` space, ASHA + TPE (the default search), ASHA + random, TPE without early stopping
and random without early stopping, each with --seeds seeds, and stops every search at the
same total compute: --budget-epochs trial epochs (an epoch of a trial on --train-fraction of
Training, plus its PublicTest evaluation). Known-good configurations are left out, so the
methods are compared on their own. Every reported epoch is logged as it arrives in the
driver, so the anytime curve (best objective so far against cumulative trial epochs and
against wall seconds) is exact. Writes under --out (results/benchmarks/):

- `search_efficiency_curves.csv`: method, seed, wall seconds, cumulative trial epochs,
  trial-seconds, the epoch's objective and the best objective so far;
- `search_efficiency.png`: the curves, median over seeds with the min-max band;
- `search_efficiency.csv`: the headline per method: the trial epochs each needs to reach
  the accuracy random search without early stopping reaches with its whole budget (the mean
  over its seeds; median over seeds, `inf` when not within the budget), as a share of that
  budget (`budget_ratio`: how many times less compute), and the final best objective.

Defaults take about 35 minutes on 2 CPU cores; the sizes are flags.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray.tune import Stopper  # noqa: E402

from search.run import build_tuner, load_search_data  # noqa: E402
from search.tuning.callbacks import TrialsCsvWriter  # noqa: E402
from search.tuning.cluster import start_ray, tolerate_lost_workers, trial_resources  # noqa: E402
from search.tuning.console import Tally  # noqa: E402
from search.tuning.settings import parse_settings  # noqa: E402
from trainables.files import write_csv  # noqa: E402
from trainables.metrics import METRIC  # noqa: E402

# name -> (searcher, scheduler)
METHODS = {"asha_tpe": ("optuna", "asha"), "asha_random": ("random", "asha"),
           "tpe": ("optuna", "fifo"), "random": ("random", "fifo")}
REFERENCE = "random"  # the baseline: random search, every trial trained to the end


class EpochBudget(Stopper):
    """Stop the search after `budget` trial epochs; log every reported epoch as it arrives."""

    def __init__(self, budget: int) -> None:
        self.budget, self.rows, self.started = budget, [], time.time()

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.rows.append({"wall_s": time.time() - self.started, "trial_id": trial_id,
                          "epoch": result.get("training_iteration", 0),
                          "epoch_seconds": result.get("time_this_iter_s", math.nan),
                          "objective": result.get(METRIC, math.nan)})
        return False

    def stop_all(self) -> bool:
        return len(self.rows) >= self.budget


def run_one(method: str, seed: int, a, out: Path, cluster: dict, tally: Tally) -> pd.DataFrame:
    """One search of `method` with `seed`, stopped at --budget-epochs; its per-epoch log."""
    searcher, scheduler = METHODS[method]
    # Enough trials that the budget, not the trial count, ends the search.
    trials = a.budget_epochs // (a.grace_epochs if scheduler == "asha" else a.max_epochs) + 2
    s = parse_settings(["--space", "convnet", "--data", a.data, "--train-fraction", str(a.train_fraction),
                        "--max-epochs", str(a.max_epochs), "--grace-epochs", str(a.grace_epochs),
                        "--searcher", searcher, "--scheduler", scheduler, "--num-samples", str(trials),
                        "--seed", str(seed), "--no-known-good", "--no-final", "--results", str(out),
                        "--name", f"{method}-seed{seed}"])
    data = load_search_data(s)
    resources, concurrent = trial_resources(s, cluster)
    stopper = EpochBudget(a.budget_epochs)
    tuner = build_tuner(s, data, s.experiment_dir, resources, concurrent, TrialsCsvWriter(s.experiment_dir,
                        s.max_epochs), stoppers=[stopper])
    tuner.fit()
    log = pd.DataFrame(stopper.rows)
    log = log.iloc[:a.budget_epochs].copy()  # epochs that arrived while the search was stopping: over budget
    log.insert(0, "method", method)
    log.insert(1, "seed", seed)
    log["trial_epochs"] = np.arange(1, len(log) + 1)
    log["trial_seconds"] = log["epoch_seconds"].cumsum()
    log["best_objective"] = log["objective"].cummax()
    tally.done(f"{method} seed {seed}: best objective {log['best_objective'].iloc[-1]:.4f} after {len(log)} trial "
               f"epochs, {log['wall_s'].iloc[-1]:.0f} s")
    return log


def headline(curves: pd.DataFrame, budget: int) -> tuple[pd.DataFrame, float]:
    """Per method: trial epochs to reach the reference's mean final best (median over seeds), and more."""
    final = curves.groupby(["method", "seed"])["best_objective"].last()
    target = float(final.loc[REFERENCE].mean())
    rows = []
    for method, runs in curves.groupby("method"):
        needed = []  # per seed; inf: not within the budget
        for _, run in runs.groupby("seed"):
            hit = run[run["best_objective"] >= target - 1e-12]
            needed.append(float(hit["trial_epochs"].iloc[0]) if len(hit) else math.inf)
        median = float(np.median(needed))
        rows.append({"method": method, "target": target,
                     "seeds_reaching": f"{sum(map(math.isfinite, needed))}/{len(needed)}",
                     "epochs_to_target_median": median,
                     "epochs_to_target_each": " ".join("never" if math.isinf(n) else str(int(n)) for n in needed),
                     "share_of_budget": median / budget,
                     "budget_ratio": budget / median,
                     "final_best_mean": float(final.loc[method].mean()),
                     "final_best_std": float(final.loc[method].std(ddof=0)),
                     "wall_s_mean": float(runs.groupby("seed")["wall_s"].last().mean())})
    order = list(METHODS)
    table = pd.DataFrame(rows).sort_values("method", key=lambda c: c.map(order.index))
    return table, target


def plot(curves: pd.DataFrame, target: float, path: Path) -> None:
    """Median best-so-far over seeds with the min-max band, against trial epochs and against wall seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, x, label in ((axes[0], "trial_epochs", "cumulative trial epochs"), (axes[1], "wall_s", "wall seconds")):
        grid = np.linspace(0, curves[x].max(), 200)
        for method in METHODS:
            runs = curves[curves["method"] == method]
            if runs.empty:
                continue
            ys = []
            for _, run in runs.groupby("seed"):
                idx = np.searchsorted(run[x].to_numpy(), grid, side="right") - 1
                y = np.where(idx >= 0, run["best_objective"].to_numpy()[np.clip(idx, 0, None)], np.nan)
                ys.append(y)
            ys = np.array(ys)
            with warnings.catch_warnings():  # before a seed's first epoch its curve is NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                line = ax.step(grid, np.nanmedian(ys, axis=0), where="post", label=method)[0]
                ax.fill_between(grid, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), step="post", alpha=0.15,
                                color=line.get_color())
        ax.axhline(target, color="grey", linestyle=":", label="random's final best (mean)")
        ax.set_xlabel(label)
        ax.set_ylabel("best PublicTest accuracy so far")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle("Search efficiency on FER2013 (convnet space): median over seeds, band = min-max")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/fer2013.csv", help="fer2013.csv or a Kaggle image folder")
    p.add_argument("--train-fraction", type=float, default=0.05, help="share of Training per trial (default 0.05)")
    p.add_argument("--max-epochs", type=int, default=4, help="epochs of a trial run to the end (default 4)")
    p.add_argument("--grace-epochs", type=int, default=1, help="ASHA's first rung (default 1)")
    p.add_argument("--budget-epochs", type=int, default=48, help="trial epochs per search (default 48)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", default="results/benchmarks", help="output folder (default results/benchmarks)")
    a = p.parse_args()
    if REFERENCE not in a.methods:
        p.error(f"--methods must include {REFERENCE}, the reference")
    out = Path(a.out)
    work = out / "search_efficiency_runs" / time.strftime("%Y%m%d-%H%M%S")
    import ray

    probe = parse_settings(["--space", "convnet", "--data", a.data, "--no-final", "--name", "probe"])
    load_search_data(probe)  # a bad --data fails here, before Ray starts
    cluster = start_ray(probe)
    tolerate_lost_workers()
    started = time.time()
    tally = Tally(a.seeds * len(a.methods), "searches")
    try:
        logs = [run_one(method, seed, a, work, cluster, tally) for seed in range(a.seeds) for method in a.methods]
    finally:
        tally.close()
        ray.shutdown()
    curves = pd.concat(logs, ignore_index=True)
    write_csv(curves, out / "search_efficiency_curves.csv")
    table, target = headline(curves, a.budget_epochs)
    write_csv(table, out / "search_efficiency.csv")
    plot(curves, target, out / "search_efficiency.png")
    print(f"\nFER2013 convnet space, {a.train_fraction:.0%} of Training per trial, {a.max_epochs} epochs per full "
          f"trial, {a.budget_epochs} trial epochs per search, {a.seeds} seeds; {time.time() - started:.0f} s in all")
    print(f"target: random search's final best, mean over seeds: {target:.4f}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out / 'search_efficiency.csv'}, {out / 'search_efficiency_curves.csv'}, "
          f"{out / 'search_efficiency.png'}")


if __name__ == "__main__":
    main()

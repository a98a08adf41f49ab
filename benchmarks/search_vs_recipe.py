"""Does the search pay? The whole job against the known-good recipe alone, at the same wall budget.

`python benchmarks/search_vs_recipe.py --data fer2013.csv` runs, on real FER2013, each
pipeline as a user would (`python -m search.run`, the README's one-hour command with
`--time-budget` set to --budget), --seeds times with different seeds:

- `search`: the whole main job: ASHA + TPE over the `convnet` space, the known-good
  configurations among its first trials, then the final stage with its share of the budget;
- `recipe` (`--recipe-only`): the known-good configurations alone: each trains one epoch on the
  search's share of Training (the final stage plans from the seconds per epoch it measures), then
  the final stage gets the rest of the budget, with the same planning (epochs, seeds, ensemble);
- `random`: random search without the known-good configurations, then the final stage.

Every pipeline is the same command but for the flags above, so they differ only in what the
search does. Each run is kept under `--out`/search_vs_recipe/<pipeline>-<budget>s-seed<seed>/
(its experiment folder, and its console output beside it in `<name>.log`); a run whose final stage has
written its metrics is read, not rerun, so the pipelines can run in separate sittings
(`--pipelines recipe`, later `--pipelines search`) and the tables are made from every run
there is. Writes under --out (results/benchmarks/):

- `search_vs_recipe_runs.csv`: one row per run: PrivateTest accuracy of the single model
  chosen on PublicTest (`single`) and of the ensemble of every final run (`ensemble`),
  without TTA and with flip, each also without the PrivateTest images duplicated in
  Training (`_dedup`), the PublicTest accuracy that chose it, the search's best trial and
  the seconds each stage took;
- `search_vs_recipe.csv`: per pipeline and budget, the mean and the spread (sample standard
  deviation; min and max) over seeds, and the difference from `recipe`;
- `search_vs_recipe.png`: the PrivateTest figures per pipeline, one dot per run.

Defaults (3 pipelines x 2 seeds x 15 minutes) take about 90 minutes on 2 CPU cores (86 measured).
PrivateTest is read by each run's final stage only, as in any search; this script reads the
tables those stages wrote.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search.tuning.console import Tally, plan_text  # noqa: E402
from trainables.files import write_csv  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The README's one-hour command but for --time-budget, --seed and where it writes.
COMMON = ["--space", "convnet", "--train-fraction", "0.3", "--max-epochs", "10", "--num-samples", "200",
          "--final-epochs", "40", "--final-share", "0.5"]
PIPELINES = {
    "search": [],
    # The space's known-good configurations, one epoch each, then the final stage (search.run.recipe_only).
    "recipe": ["--recipe-only"],
    "random": ["--searcher", "random", "--no-known-good"],
}
REFERENCE = "recipe"
FIGURES = ["single", "single_flip", "single_dedup", "ensemble", "ensemble_flip", "ensemble_dedup"]


def run_name(pipeline: str, budget: float, seed: int) -> str:
    return f"{pipeline}-{budget:g}s-seed{seed}"


def command(pipeline: str, budget: float, seed: int, data: str, results: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "search.run", *COMMON, *PIPELINES[pipeline], "--data", data,
            "--time-budget", f"{budget:g}", "--seed", str(seed), "--results", str(results),
            "--name", run_name(pipeline, budget, seed), "--no-report", *extra]


def _row(metrics: pd.DataFrame, kind: str, tta: str) -> pd.Series:
    rows = metrics[(metrics["kind"] == kind) & (metrics["tta"] == tta)]
    if rows.empty:
        raise ValueError(f"metrics.csv has no {kind} row for TTA {tta}")
    return rows.iloc[0]


def figures(experiment: Path) -> dict:
    """The PrivateTest figures of one finished run, from the tables its final stage wrote."""
    metrics = pd.read_csv(experiment / "final" / "metrics.csv", dtype={"trial_id": str})
    single, single_flip = _row(metrics, "ensemble_best", "none"), _row(metrics, "ensemble_best", "flip")
    ensemble, ensemble_flip = _row(metrics, "ensemble_all", "none"), _row(metrics, "ensemble_all", "flip")
    runs = metrics[(metrics["kind"] == "run") & (metrics["tta"] == "none")]
    trials = pd.read_csv(experiment / "trials.csv", dtype={"trial_id": str})
    out = {"single": single["accuracy"], "single_flip": single_flip["accuracy"],
           "single_dedup": single["accuracy_dedup"], "ensemble": ensemble["accuracy"],
           "ensemble_flip": ensemble_flip["accuracy"], "ensemble_dedup": ensemble["accuracy_dedup"],
           "single_publictest": single["val_acc"], "ensemble_publictest": ensemble["val_acc"],
           "final_runs": len(runs), "final_configs": runs["trial_id"].nunique(),
           "trials": len(trials),
           "search_best": trials["objective"].max()}
    budget = experiment / "time_budget.json"
    if budget.exists():
        split = json.loads(budget.read_text())
        out.update({f"{k}_s": split[k] for k in ("startup", "search", "final", "total") if k in split})
        plan = split.get("plan") or {}
        out["final_plan"] = plan_text(plan["top_k"], plan["seeds"], plan["epochs"]) if plan else ""
    return out


def finished(experiment: Path) -> bool:
    return (experiment / "final" / "metrics.csv").is_file()


def run_one(pipeline: str, budget: float, seed: int, a, work: Path) -> dict:
    name = run_name(pipeline, budget, seed)
    experiment, log_path = work / name, work / f"{name}.log"
    started = time.time()
    if not finished(experiment):
        shutil.rmtree(experiment, ignore_errors=True)  # an interrupted run starts again from nothing
        cmd = command(pipeline, budget, seed, a.data, work, a.extra)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(log_path, "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        if code != 0 or not finished(experiment):
            raise SystemExit(f"{name} failed (exit {code}): see {log_path}")
    return {"pipeline": pipeline, "budget_s": budget, "seed": seed, **figures(experiment),
            "wall_s": time.time() - started}


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, spread and range per pipeline and budget, and each mean's difference from the recipe's."""
    rows = []
    for (budget, pipeline), g in runs.groupby(["budget_s", "pipeline"], sort=True):
        row = {"budget_s": budget, "pipeline": pipeline, "runs": len(g)}
        ref = runs[(runs["budget_s"] == budget) & (runs["pipeline"] == REFERENCE)]
        for f in FIGURES:
            row[f"{f}_mean"] = g[f].mean()
            row[f"{f}_std"] = g[f].std(ddof=1) if len(g) > 1 else float("nan")
            row[f"{f}_min"], row[f"{f}_max"] = g[f].min(), g[f].max()
            row[f"{f}_vs_recipe"] = g[f].mean() - ref[f].mean() if len(ref) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def plot(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(runs["budget_s"].unique())
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 4.2), squeeze=False)
    shown = ["single", "single_flip", "ensemble", "ensemble_flip"]
    for ax, budget in zip(axes[0], budgets):
        part = runs[runs["budget_s"] == budget]
        pipelines = [p for p in PIPELINES if p in set(part["pipeline"])]
        for i, pipeline in enumerate(pipelines):
            g = part[part["pipeline"] == pipeline]
            for j, f in enumerate(shown):
                x = i + (j - 1.5) * 0.18
                ax.scatter([x] * len(g), 100 * g[f], s=22, color=f"C{j}", label=f if i == 0 else None)
                ax.hlines(100 * g[f].mean(), x - 0.07, x + 0.07, color=f"C{j}")
        ax.set_xticks(range(len(pipelines)), pipelines)
        ax.set_ylabel("PrivateTest accuracy (%)")
        ax.set_title(f"{budget / 60:g} minutes on 2 CPU cores, one dot per run")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/fer2013.csv", help="FER2013 as Kaggle's fer2013.csv")
    p.add_argument("--budget", type=float, nargs="+", default=[900.0],
                   help="wall seconds per run, each pipeline the same (default 900; several: one set of runs each)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the runs' --seed values (default 0 1)")
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    p.add_argument("--out", default="results/benchmarks", help="output folder (default results/benchmarks)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="flags passed on to every search.run (after everything else)")
    a = p.parse_args(argv)
    if not a.data == "demo" and not Path(a.data).is_file():
        p.error(f"--data {a.data}: no such file")
    out = Path(a.out)
    work = out / "search_vs_recipe"
    work.mkdir(parents=True, exist_ok=True)
    planned = [(b, s, pl) for b in a.budget for s in a.seeds for pl in a.pipelines]
    tally = Tally(len(planned), "runs")
    try:
        for budget, seed, pipeline in planned:
            row = run_one(pipeline, budget, seed, a, work)
            tally.done(f"{run_name(pipeline, budget, seed)}: PrivateTest single {row['single']:.4f} "
                       f"(flip {row['single_flip']:.4f}), ensemble {row['ensemble']:.4f} "
                       f"(flip {row['ensemble_flip']:.4f}), {row['wall_s']:.0f} s")
    finally:
        tally.close()
    # Every finished run there is, this sitting's and earlier ones'.
    rows = []
    for experiment in sorted(work.iterdir()):
        m = re.fullmatch(r"(\w+)-([\d.e+]+)s-seed(\d+)", experiment.name)
        if experiment.is_dir() and m and m.group(1) in PIPELINES and finished(experiment):
            rows.append({"pipeline": m.group(1), "budget_s": float(m.group(2)), "seed": int(m.group(3)),
                         **figures(experiment)})
    runs = pd.DataFrame(rows).sort_values(["budget_s", "pipeline", "seed"])
    write_csv(runs, out / "search_vs_recipe_runs.csv")
    table = summarize(runs)
    write_csv(table, out / "search_vs_recipe.csv")
    plot(runs, out / "search_vs_recipe.png")
    shown = ["budget_s", "pipeline", "runs"] + [f"{f}_{k}" for f in ("single", "ensemble")
                                                for k in ("mean", "std", "vs_recipe")]
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"written: {out / 'search_vs_recipe_runs.csv'}, {out / 'search_vs_recipe.csv'}, "
          f"{out / 'search_vs_recipe.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

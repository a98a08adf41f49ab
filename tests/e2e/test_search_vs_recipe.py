"""benchmarks/search_vs_recipe.py end to end at a tiny size on demo data: one real run of the recipe
pipeline, a second sitting that reads finished runs instead of rerunning them, and the merged tables."""
from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # a real search.run with its final stage, on demo data

SCRIPT = ROOT / "benchmarks" / "search_vs_recipe.py"
# Smaller than the README's hour (flags after --extra override the pipeline's): the two known-good
# configurations one epoch each on 20% of demo Training, then final runs of 2 epochs.
TINY = ["--extra", "--train-fraction", "0.2", "--final-epochs", "2", "--final-seeds", "2", "--final-top-k", "1"]


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"})


def test_runs_are_kept_read_back_and_merged(tmp_path):
    out = tmp_path / "bench"
    r = run_benchmark("--data", "demo", "--budget", "75", "--seeds", "0", "--pipelines", "recipe",
                      "--out", str(out), *TINY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    work = out / "search_vs_recipe"
    run = work / "recipe-75s-seed0"
    log = (work / "recipe-75s-seed0.log").read_text()
    assert log.startswith(f"{sys.executable} -m search.run ") and "--recipe-only" in log
    assert "no search (--recipe-only): its 2 known-good configurations" in log
    assert "--time-budget 75 --seed 0" in log and "final stage within the time budget" in log
    trials = pd.read_csv(run / "trials.csv", dtype={"trial_id": str})
    assert len(trials) == 2 and (trials["epochs"] == 1).all()  # the known-good recipes, one epoch each
    metrics = pd.read_csv(run / "final" / "metrics.csv", dtype={"trial_id": str})
    best = metrics[(metrics["kind"] == "ensemble_best") & (metrics["tta"] == "none")].iloc[0]
    ensemble = metrics[(metrics["kind"] == "ensemble_all") & (metrics["tta"] == "flip")].iloc[0]

    # A second sitting: the finished run is read, not rerun; another pipeline's run (a copy standing in
    # for one made earlier) joins the tables.
    shutil.copytree(run, work / "search-75s-seed0")
    mtime = (work / "recipe-75s-seed0.log").stat().st_mtime
    r = run_benchmark("--data", "demo", "--budget", "75", "--seeds", "0", "--pipelines", "recipe", "search",
                      "--out", str(out), *TINY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (work / "recipe-75s-seed0.log").stat().st_mtime == mtime and not (work / "search-75s-seed0.log").exists()
    assert "2/2 runs done" in r.stdout

    runs = pd.read_csv(out / "search_vs_recipe_runs.csv")
    assert sorted(runs["pipeline"]) == ["recipe", "search"]
    row = runs[runs["pipeline"] == "recipe"].iloc[0]
    assert row["single"] == pytest.approx(best["accuracy"]) and row["single_dedup"] == pytest.approx(
        best["accuracy_dedup"]) and row["single_publictest"] == pytest.approx(best["val_acc"])
    assert row["ensemble_flip"] == pytest.approx(ensemble["accuracy"])
    assert row["trials"] == 2 and row["total_s"] <= 75 * 1.1
    table = pd.read_csv(out / "search_vs_recipe.csv")
    assert list(table["pipeline"]) == ["recipe", "search"] and (table["runs"] == 1).all()
    assert (table["single_vs_recipe"] == 0).all()  # the copy scores what the recipe run scored
    assert (out / "search_vs_recipe.png").stat().st_size > 10_000


def test_summary_spread_and_difference_from_the_recipe():
    bench = runpy.run_path(str(SCRIPT), run_name="search_vs_recipe")
    figures = {f: 0.0 for f in bench["FIGURES"]}
    runs = pd.DataFrame([
        {"pipeline": "recipe", "budget_s": 900.0, "seed": 0, **figures, "single": 0.60},
        {"pipeline": "recipe", "budget_s": 900.0, "seed": 1, **figures, "single": 0.64},
        {"pipeline": "search", "budget_s": 900.0, "seed": 0, **figures, "single": 0.65},
        {"pipeline": "search", "budget_s": 900.0, "seed": 1, **figures, "single": 0.67},
    ])
    table = bench["summarize"](runs).set_index("pipeline")
    assert table.loc["recipe", "single_mean"] == pytest.approx(0.62)
    assert table.loc["recipe", "single_std"] == pytest.approx(0.0282843, abs=1e-6)  # sample std of 0.60, 0.64
    assert table.loc["search", "single_vs_recipe"] == pytest.approx(0.04)
    assert (table.loc["search", "single_min"], table.loc["search", "single_max"]) == (0.65, 0.67)


def test_a_missing_data_file_is_one_line_and_exit_2(tmp_path):
    r = run_benchmark("--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr

"""benchmarks/gpu_check.py on the CPU: the subset file it writes, and its table of 1 and 2 trials at once."""
from __future__ import annotations

import os
import runpy
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.helpers import ROOT, SHARED_FER, write_fer_csv
from trainables.data import SPLITS, load_fer2013

pytestmark = pytest.mark.slow  # the GPU check's real runs, at tiny sizes on the CPU

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SIZES = {"Training": 700, "PublicTest": 84, "PrivateTest": 28}


def run_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the script as a user would, from the repository root."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def gpu_check():
    """The script's functions, loaded in this process (for what spawns no workers)."""
    return runpy.run_path(str(SCRIPT), run_name="gpu_check")


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    """A Kaggle-format fer2013.csv of 812 rows: real faces from the shared copy where it exists, else synthetic."""
    path = tmp_path_factory.mktemp("fer") / "fer2013.csv"
    npz = SHARED_FER / "fer2013.npz"
    if not npz.exists():
        return write_fer_csv(path, n_per_split=tuple(SIZES.values()))
    with np.load(npz) as d:
        usage = d["usage"]
        rows = np.concatenate([np.flatnonzero(usage == i)[:SIZES[name]] for i, name in enumerate(SPLITS)])
        pixels, emotion = d["pixels"][rows], d["emotion"][rows]
    lines = [f"{y},{' '.join(map(str, x.ravel().tolist()))},{SPLITS[u]}"
             for x, y, u in zip(pixels, emotion, usage[rows])]
    path.write_text("\n".join(["emotion,pixels,Usage", *lines]) + "\n")
    return path


@pytest.fixture(scope="module")
def subset(small_csv, tmp_path_factory):
    """The subset file the script writes from that CSV: 210 of its 700 Training faces, all of PublicTest."""
    out = tmp_path_factory.mktemp("subset") / "fer_subset.npz"
    r = run_check("--make-subset", str(out), "--data", str(small_csv), "--train-images", "210")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"wrote {out}: 210 Training + {SIZES['PublicTest']} PublicTest images" in r.stdout
    return out


def test_subset_holds_a_stratified_training_sample_and_all_of_public_test(small_csv, subset):
    full = load_fer2013(small_csv, splits=SPLITS, cache=False)
    with np.load(subset) as d:
        pixels, emotion, usage, rows = d["pixels"], d["emotion"], d["usage"], d["rows"]
        assert list(d["usage_names"]) == ["Training", "PublicTest"]
    assert pixels.dtype == np.uint8 and pixels.shape == (len(usage), 48, 48)
    assert set(usage.tolist()) == {0, 1}  # never PrivateTest
    assert emotion.min() >= 0 and emotion.max() <= 6
    val = usage == 1
    assert np.array_equal(rows[val], full.val.rows.numpy())  # every PublicTest face, in order
    assert np.array_equal(pixels[val], full.val.x.numpy()) and np.array_equal(emotion[val], full.val.y.numpy())
    train = ~val
    position = {int(r): i for i, r in enumerate(full.train.rows)}
    picked = np.array([position[int(r)] for r in rows[train]])  # KeyError: a face that is not Training
    assert len(set(picked.tolist())) == train.sum() == 210
    assert np.array_equal(pixels[train], full.train.x.numpy()[picked])
    assert np.array_equal(emotion[train], full.train.y.numpy()[picked])
    source = np.bincount(full.train.y.numpy(), minlength=7)
    assert np.abs(np.bincount(emotion[train], minlength=7) - 0.3 * source).max() <= 1  # stratified


def test_check_table_for_one_and_two_trials_at_once(subset, tmp_path):
    out = tmp_path / "gpu_check.csv"
    r = run_check("--device", "cpu", "--data", str(subset), "--models", "convnet", "--n-trials", "1", "2",
                  "--epochs", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hardware: cpu" in r.stdout and "elapsed" in r.stdout
    df = pd.read_csv(out)
    assert df[["model", "n_trials", "finished"]].values.tolist() == [["convnet", 1, 1], ["convnet", 2, 2]]
    assert (df["device"] == "cpu").all() and (df["train_images"] == 210).all() and df["note"].isna().all()
    assert (df[["img_s_per_trial", "img_s_first_epoch", "img_s_total_wall"]] > 0).all().all()
    two = df.iloc[1]
    assert two["img_s_total"] == pytest.approx(2 * two["img_s_per_trial"])  # the sum over the trials
    assert df["speedup"].iloc[0] == pytest.approx(1.0)
    assert df["val_acc_mean"].between(0, 1).all()
    assert (df["val_acc_min"] <= df["val_acc_max"]).all() and (df["peak_rss_mib"] > 0).all()
    assert df["precision"].isin(["fp32", "bf16"]).all()


def test_check_runs_where_matplotlib_lr_finder_ray_and_optuna_are_missing(subset, tmp_path):
    """What a bare GPU machine has: torch, numpy, pandas and the carried kornia wheels."""
    blocked = tmp_path / "blocked"
    for name in ("matplotlib", "torch_lr_finder", "ray", "optuna"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked by this test')\n")
    env = {"PYTHONPATH": str(blocked)}  # the spawned workers inherit it
    out = tmp_path / "gpu_check.csv"
    r = run_check("--device", "cpu", "--data", str(subset), "--models", "convnet", "--n-trials", "1",
                  "--epochs", "1", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    row = pd.read_csv(out).iloc[0]
    assert row["finished"] == 1 and row["img_s_per_trial"] > 0 and 0 <= row["val_acc_mean"] <= 1


def test_time_limit_skips_and_bad_flags_are_one_line(gpu_check, subset, tmp_path, capsys):
    out = tmp_path / "gpu_check.csv"
    cli, main = gpu_check["run_cli"], gpu_check["main"]
    code = cli(main, ["--device", "cpu", "--data", str(subset), "--models", "convnet", "resnet18-keep",
                      "--n-trials", "1", "2", "--time-limit", "0.001", "--out", str(out)])
    assert code == 0
    df = pd.read_csv(out)
    assert len(df) == 4 and (df["finished"] == 0).all() and df["note"].str.startswith("skipped").all()
    assert capsys.readouterr().out.count("skipped") >= 4
    assert cli(main, ["--data", str(subset), "--models", "vgg"]) == 2
    assert "error: unknown model 'vgg'" in capsys.readouterr().err
    assert cli(main, ["--device", "cpu", "--data", str(subset), "--augment", "nope"]) == 2
    assert "unknown augmentation policy 'nope'" in capsys.readouterr().err

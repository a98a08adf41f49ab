"""The search through the real CLI: on the demo data, and on a slice of the real FER2013."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from tests.helpers import run_command


def _tb_tags(trial_dir):
    tags = set()
    for f in trial_dir.glob("events.out.tfevents.*"):
        for ev in EventFileLoader(str(f)).Load():
            tags.update(v.tag for v in ev.summary.value)
    return tags


@pytest.fixture(scope="module")
def demo_experiment(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    r = run_command("search.run", "--space", "convnet", "--data", "demo", "--num-samples", "3", "--max-epochs", "2",
                "--grace-epochs", "1", "--results", str(results), "--name", "demo", "--no-final", "--seed", "43")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return results / "demo", r


def test_trials_csv_has_one_row_per_trial(demo_experiment):
    exp, _ = demo_experiment
    df = pd.read_csv(exp / "trials.csv")
    assert len(df) == 3 and df["trial_id"].is_unique
    for col in ["trial_id", "status", "val_acc", "epochs", "seconds", "node_id", "config/arch", "config/lr_mode",
                "config/optimizer", "config/augment", "config/batch_size", "config/weight_decay"]:
        assert col in df.columns, col
    assert set(df["status"]) <= {"COMPLETED", "STOPPED"}
    assert df["val_acc"].between(0, 1).all() and df["epochs"].between(1, 2).all()
    assert (df["seconds"] > 0).all() and df["node_id"].str.len().gt(10).all()
    assert df["val_acc"].is_monotonic_decreasing  # best first


def test_settings_json_is_the_resolved_settings(demo_experiment):
    exp, _ = demo_experiment
    s = json.loads((exp / "settings.json").read_text())
    assert s["space"] == "convnet" and s["num_samples"] == 3 and s["max_epochs"] == 2 and s["name"] == "demo"


def test_every_trial_is_in_tensorboard(demo_experiment):
    exp, r = demo_experiment
    trial_dirs = [d for d in (exp / "tune").iterdir() if d.is_dir()]
    assert len(trial_dirs) == 3
    for d in trial_dirs:
        tags = _tb_tags(d)
        assert {"ray/tune/val_acc", "ray/tune/train_loss", "ray/tune/lr"} <= tags
        assert "_hparams_/session_start_info" in tags  # the trial's hyperparameters
    assert f"tensorboard --logdir {exp}" in r.stdout


def test_search_on_real_fer2013(tmp_path, real_fer_csv):
    # Seed 77: TPE's first draws are small ConvNets (Adam at 2.7e-3; AdamW with mixup) that learn fast.
    r = run_command("search.run", "--space", "convnet", "--data", str(real_fer_csv), "--train-fraction", "0.2",
                "--num-samples", "2", "--max-epochs", "2", "--scheduler", "fifo", "--seed", "77",
                "--results", str(tmp_path), "--name", "real", "--no-final")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = pd.read_csv(tmp_path / "real" / "trials.csv")
    assert len(df) == 2 and df["val_acc"].between(0, 1).all()
    assert df["val_acc"].max() > 0.30  # PublicTest's majority class (happy) is 24.9%
    n_train = int(re.search(r"(\d+) training images, 3589 PublicTest images", r.stdout).group(1))
    assert abs(n_train - 5742) <= 4  # a stratified 20% of Training's 28,709

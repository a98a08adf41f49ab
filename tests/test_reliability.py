"""Reliability through the real CLI: failing and diverging trials, SIGKILL then --resume, Ctrl-C."""
from __future__ import annotations

import glob
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from tests.helpers import ROOT, run_command

# With TPE seeded 5, the first four convnet configs use sgd, adam, adamw, adamw.
COMMON = ["--space", "convnet", "--data", "demo", "--max-epochs", "2", "--grace-epochs", "1",
          "--scheduler", "fifo", "--no-final", "--seed", "5"]


def _results(trial_dir: Path) -> list[dict]:
    lines = (trial_dir / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _epochs(trial_dir: Path) -> list[int]:
    return [r.get("epoch") for r in _results(trial_dir)]


def _trained_epochs(trial_dir: Path) -> set[tuple]:
    """Each trained epoch once: a finished trial re-reported after a kill repeats its saved result."""
    return {(r["epoch"], r["val_acc"], r["train_loss"], r["seconds"]) for r in _results(trial_dir)}


def _study_trials(exp: Path):
    # One file per driver session, named by its start time: the last name is the latest session
    # (mtimes are useless: Ray rewrites every file of the folder when it syncs the experiment).
    newest = max(glob.glob(str(exp / "tune" / "searcher-state-*.pkl")))
    with open(newest, "rb") as f:
        state = pickle.load(f)
    return state["_ot_study"].trials


def test_failing_and_diverging_trials_do_not_stop_the_search(tmp_path):
    env = {"FER_INJECT_FAILURE": "optimizer=sgd@1;optimizer=adam@1:once", "FER_INJECT_NAN": "optimizer=adamw"}
    r = run_command("search.run", *COMMON, "--num-samples", "4", "--results", str(tmp_path), "--name", "f", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = pd.read_csv(tmp_path / "f" / "trials.csv")
    assert len(df) == 4
    by_opt = {opt: set(g["status"]) for opt, g in df.groupby("config/optimizer")}
    assert by_opt == {"sgd": {"ERROR"}, "adam": {"COMPLETED"}, "adamw": {"DIVERGED"}}
    sgd = df[df["config/optimizer"] == "sgd"].iloc[0]
    assert "injected failure" in sgd["error"] and sgd["epochs"] == 1
    # The transient failure was retried from its epoch-1 checkpoint, not from scratch.
    adam = df[df["config/optimizer"] == "adam"].iloc[0]
    assert _epochs(tmp_path / "f" / "tune" / f"trial_{adam['trial_id']}") == [1, 2]
    # Optuna saw finite values for every finished trial: NaN never reaches the sampler.
    values = [t.value for t in _study_trials(tmp_path / "f") if t.state.name == "COMPLETE"]
    assert len(values) == 3 and all(math.isfinite(v) for v in values)


def _start(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "search.run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _finished_trials(exp: Path) -> dict[str, set[tuple]]:
    out = {}
    for d in (exp / "tune").glob("trial_*"):
        if (d / "result.json").exists() and 2 in _epochs(d):
            out[d.name] = _trained_epochs(d)
    return out


def _wait_for(cond, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(1)
    return False


def test_sigkill_then_resume_keeps_finished_trials(tmp_path):
    exp = tmp_path / "k"
    args = [*COMMON, "--num-samples", "5", "--results", str(tmp_path), "--name", "k", "--max-concurrent", "2"]
    p = _start(args, start_new_session=True)
    try:
        assert _wait_for(lambda: len(_finished_trials(exp)) >= 2), "no trial finished in time"
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and its local Ray die at once
        p.communicate()
    before = _finished_trials(exp)
    studied_before = {t.number for t in _study_trials(exp) if t.state.name == "COMPLETE"}

    r = run_command("search.run", *args, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = pd.read_csv(exp / "trials.csv")
    assert len(df) == 5 and set(df["status"]) == {"COMPLETED"}
    for name, epochs in before.items():  # finished before the kill: kept, not retrained
        assert _trained_epochs(exp / "tune" / name) == epochs
    trials = _study_trials(exp)
    assert len(trials) == 5 and all(t.state.name == "COMPLETE" for t in trials)
    assert studied_before <= {t.number for t in trials}  # the Optuna history survived the kill
    finished = dict(zip(df["trial_id"], df["val_acc"]))
    assert sorted(round(t.value, 6) for t in trials) == sorted(
        round(json.loads((exp / "tune" / f"trial_{tid}" / "result.json").read_text().splitlines()[-1])["val_acc"], 6)
        for tid in finished)


def test_ctrl_c_exports_and_exits_130(tmp_path):
    exp = tmp_path / "c"
    p = _start([*COMMON, "--num-samples", "6", "--results", str(tmp_path), "--name", "c"])
    assert _wait_for(lambda: any((exp / "tune").glob("trial_*/result.json"))
                     and any(d.stat().st_size for d in (exp / "tune").glob("trial_*/result.json")))
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, out[-2000:] + err[-2000:]
    assert f"--name c --results {tmp_path} --resume" in err and "Traceback" not in err
    df = pd.read_csv(exp / "trials.csv")
    assert len(df) >= 1 and df["status"].isin(["PENDING", "RUNNING", "PAUSED", "COMPLETED"]).all()

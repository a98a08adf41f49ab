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

import pytest

from search.tuning.study import TRIAL_ATTR, load_study
from tests.helpers import ROOT, read_table, run_command

pytestmark = pytest.mark.slow  # searches through the real CLI, killed, interrupted and resumed

# With TPE seeded 5, the first five convnet configs (TPE's random start-up draws) are:
# sgd/bs64, adamw/bs64/mixup, adam/bs64, adam/bs64, adamw/bs128.
COMMON = ["--space", "convnet", "--data", "demo", "--train-fraction", "0.5", "--max-epochs", "2",
          "--grace-epochs", "1", "--scheduler", "fifo", "--searcher", "random", "--no-final", "--seed", "5",
          "--no-known-good", "--no-report"]  # the seeded sampler's own configurations, which these tests are built on


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


def _best_finite(trial_dir: Path) -> float:
    return max(r["val_acc"] for r in _results(trial_dir) if not r.get("diverged"))


def test_failing_and_diverging_trials_do_not_stop_the_search(tmp_path):
    # sgd fails at epoch 1 every time; each adam fails there twice, and --max-failures 2 lets
    # the third attempt finish; the two adamw trials train one finite epoch, then their loss
    # turns NaN (mixup) or infinite (batch 128).
    env = {"FER_INJECT_FAILURE": "optimizer=sgd@1;optimizer=adam@1:2",
           "FER_INJECT_DIVERGE": "augment=mixup@1:nan;batch_size=128@1:inf"}
    # All 5 trials at once on the 1-CPU slots: those waiting for a slot take a finished trial's worker
    # (reuse needs a trial waiting when one ends; with --max-concurrent at the CPU count none may be,
    # and a fresh clone's run once reused no worker at all).
    r = run_command("search.run", *COMMON, "--num-samples", "5", "--max-failures", "2", "--results", str(tmp_path),
                    "--name", "f", "--max-concurrent", "5", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = tmp_path / "f"
    df = read_table(exp / "trials.csv")
    assert len(df) == 5
    by_opt = {opt: sorted(g["status"]) for opt, g in df.groupby("config/optimizer")}
    assert by_opt == {"sgd": ["ERROR"], "adam": ["COMPLETED", "COMPLETED"], "adamw": ["DIVERGED", "DIVERGED"]}
    sgd = df[df["config/optimizer"] == "sgd"].iloc[0]
    assert "injected failure" in sgd["error"] and sgd["epochs"] == 1
    assert (exp / "tune" / f"trial_{sgd['trial_id']}" / "injected_failures").read_text() == "3"  # 1 + 2 retries
    for _, adam in df[df["config/optimizer"] == "adam"].iterrows():  # retried from the epoch-1 checkpoint
        trial_dir = exp / "tune" / f"trial_{adam['trial_id']}"
        assert _epochs(trial_dir) == [1, 2] and (trial_dir / "injected_failures").read_text() == "2"
    diverged = df[df["status"] == "DIVERGED"].set_index("config/augment")
    assert "nan" in diverged.loc["mixup", "error"] and "inf" in diverged.loc["none", "error"]
    assert (diverged["epochs"] == 1).all()  # the finite epoch before the blow-up counts
    # A diverged trial is not rewarded: its objective (what Optuna was told) is the accuracy of
    # the model it diverged to, while trials.csv keeps the best finite accuracy it reached apart.
    for _, row in diverged.iterrows():
        rows = _results(exp / "tune" / f"trial_{row['trial_id']}")
        assert rows[-1]["diverged"] == 1 and row["objective"] == pytest.approx(rows[-1]["val_acc"])
        assert row["val_acc"] == pytest.approx(_best_finite(exp / "tune" / f"trial_{row['trial_id']}"))
    assert (diverged["objective"] <= 0.3).all()  # NaN weights predict one class; inf logits likewise
    # Optuna's value of every finished trial is its trials.csv objective; the errored trial is a
    # failed study trial, without a value.
    values = sorted(t.value for t in _study_trials(exp) if t.state.name == "COMPLETE")
    assert values == sorted(df[df["status"] != "ERROR"]["objective"]) and all(math.isfinite(v) for v in values)
    _each_trial_kept_its_own(exp, df)


def _each_trial_kept_its_own(exp: Path, df) -> None:
    """Worker processes were reused (reuse_actors, the default), and everything a trial left is its own:
    its checkpoint holds its configuration, its folder a failure marker only where the hook matches it,
    and a reused worker only ever ran trials with one resource request (memory included)."""
    import torch

    from search.tuning.cluster import trial_request

    ran: dict[int, set[str]] = {}
    for _, row in df.iterrows():
        trial_dir = exp / "tune" / f"trial_{row['trial_id']}"
        for result in _results(trial_dir):
            ran.setdefault(result["pid"], set()).add(row["trial_id"])
        state = torch.load(max(trial_dir.glob("checkpoint_*")) / "run.pt", weights_only=True)
        for key in ("optimizer", "batch_size", "augment", "width"):
            assert state["config"][key] == row[f"config/{key}"], (row["trial_id"], key)
        assert (trial_dir / "injected_failures").exists() == (row["config/optimizer"] in {"sgd", "adam"})
    shared = [tids for tids in ran.values() if len(tids) > 1]
    assert shared, ran  # some worker ran more than one trial
    params = {tid: json.loads((exp / "tune" / f"trial_{tid}" / "params.json").read_text()) for tid in df["trial_id"]}
    limits = {"cpu": 16 * 2**30}
    for tids in shared:
        requests = {str(trial_request(params[t], cpus=1, gpus=0, limits=limits, num_classes=7).bundles) for t in tids}
        assert len(requests) == 1, (tids, requests)


def _start(args, env: dict | None = None):
    full = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", **(env or {})}
    # Its own session, so that the driver and the local Ray it started can be killed as one group.
    return subprocess.Popen([sys.executable, "-m", "search.run", *args], cwd=ROOT, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill(p: subprocess.Popen) -> None:
    """SIGKILL the process group of `p` unless it has already exited."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()


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


def _completed_in_study(exp: Path) -> int:
    """Finished trials in the searcher state Tune last saved (0 while none is readable yet)."""
    try:
        return sum(t.state.name == "COMPLETE" for t in _study_trials(exp))
    except (ValueError, OSError, EOFError, pickle.UnpicklingError):  # none yet, or caught mid-write
        return 0


def _hung_trial(exp: Path) -> str | None:
    """The sgd trial once it has checkpointed epoch 1 (it then blocks before epoch 2)."""
    for d in (exp / "tune").glob("trial_*"):
        if (d / "result.json").exists() and _epochs(d) == [1] and (d / "params.json").exists() \
                and json.loads((d / "params.json").read_text()).get("optimizer") == "sgd":
            return d.name
    return None


def test_sigkill_then_resume_keeps_finished_trials(tmp_path):
    exp = tmp_path / "k"
    args = [*COMMON, "--num-samples", "5", "--results", str(tmp_path), "--name", "k", "--max-concurrent", "2"]
    # The sgd trial stops after its first epoch, so the kill always catches one trial mid-run.
    p = _start(args, env={"FER_INJECT_HANG": "optimizer=sgd@1"})
    try:
        assert _wait_for(lambda: len(_finished_trials(exp)) >= 2 and _hung_trial(exp)
                         and _completed_in_study(exp) >= 2), "no trial finished in time"
    finally:
        _kill(p)  # the driver and its local Ray die at once
    before = _finished_trials(exp)
    hung = _hung_trial(exp)
    # trials.csv is written as trials finish, so a killed driver leaves it behind, current: every trial
    # whose folder shows it finished is COMPLETED there. It may be ahead of the folders: Tune writes
    # result.json in a staging folder and copies it into the experiment now and then, so a trial that
    # finished just before the kill can be COMPLETED in trials.csv with its last epoch not yet copied.
    written = read_table(exp / "trials.csv")
    completed = {f"trial_{t}" for t in written[written["status"] == "COMPLETED"]["trial_id"]}
    assert len(before) >= 2 and set(before) <= completed
    studied_before = {t.number: (t.params, t.value) for t in _study_trials(exp) if t.state.name == "COMPLETE"}
    assert len(studied_before) >= 2

    r = run_command("search.run", *args, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = read_table(exp / "trials.csv")
    assert len(df) == 5 and set(df["status"]) == {"COMPLETED"}
    for name, epochs in before.items():  # finished before the kill: kept, not retrained
        assert _trained_epochs(exp / "tune" / name) == epochs
    # The unfinished trial continued from its epoch-1 checkpoint: epoch 1 was not trained again.
    assert _epochs(exp / "tune" / hung) == [1, 2]
    # optuna.db, what the dashboard shows, agrees with Tune after the resume: one finished trial per
    # row of trials.csv with its objective (a trial that ended after Tune's last snapshot ran again).
    trials = {t.number: t for t in load_study(exp).trials}
    assert len(trials) == 5 and all(t.state.name == "COMPLETE" for t in trials.values())
    for number, (params, value) in studied_before.items():  # the Optuna history survived the kill
        assert trials[number].params == params and trials[number].value == value
    by_id = {t.user_attrs[TRIAL_ATTR]: t for t in trials.values()}
    assert sorted(by_id) == sorted(df["trial_id"])
    for row in df.itertuples():  # the resumed trial's too
        assert by_id[row.trial_id].value == pytest.approx(row.objective)


def test_ctrl_c_exports_and_exits_130(tmp_path):
    exp = tmp_path / "c"
    p = _start([*COMMON, "--num-samples", "6", "--results", str(tmp_path), "--name", "c"])
    try:
        assert _wait_for(lambda: any(d.stat().st_size for d in (exp / "tune").glob("trial_*/result.json")))
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        _kill(p)  # a failed check must not leave the driver and its Ray running
    assert p.returncode == 130, out[-2000:] + err[-2000:]
    assert f"--name c --results {tmp_path} --resume" in err and "Traceback" not in err
    df = read_table(exp / "trials.csv")
    assert len(df) >= 1 and df["status"].isin(["PENDING", "RUNNING", "PAUSED", "COMPLETED"]).all()


def test_a_worker_killed_for_memory_costs_only_its_trial(tmp_path):
    """Ray's memory monitor kills the sgd trial's worker (it holds half the machine's memory, over a
    30% threshold): that trial is retried, then ERROR with the reason; the search finishes (exit 0)."""
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    env = {"RAY_memory_usage_threshold": "0.3", "RAY_memory_monitor_refresh_ms": "250",
           "FER_INJECT_ALLOC": f"optimizer=sgd@0:{0.5 * total_gib:.1f}"}
    r = run_command("search.run", *COMMON, "--num-samples", "3", "--max-concurrent", "1", "--max-epochs", "1",
                    "--results", str(tmp_path), "--name", "m", env=env)
    # The driver finishes (exit 0); a killed worker's own shutdown noise in Ray's log is not the driver's.
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = read_table(tmp_path / "m" / "trials.csv")
    assert len(df) == 3
    sgd = df[df["config/optimizer"] == "sgd"].iloc[0]
    assert sgd["status"] == "ERROR" and "OutOfMemoryError" in sgd["error"] and "killed" in sgd["error"]
    assert set(df[df["config/optimizer"] != "sgd"]["status"]) == {"COMPLETED"}


def test_a_trial_that_cannot_fit_fails_alone_with_its_reason(tmp_path):
    # Seed 2 draws ResNet-50 (stride, batch 64), ResNet-18 (stride, 128), ResNet-101 (keep, 256);
    # with the largest node taken as 1.8 GiB only the ResNet-18 (about 1.5 GiB estimated in bf16) fits.
    r = run_command("search.run", "--space", "resnet", "--seed", "2", "--no-known-good", "--data", "demo",
                    "--train-fraction", "0.05",
                    "--num-samples", "3", "--max-epochs", "1", "--grace-epochs", "1", "--no-final", "--no-report",
                    "--results", str(tmp_path), "--name", "n", env={"FER_INJECT_MEMORY_LIMIT": "1.8"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]  # (Ray logs each failed trial's traceback)
    df = read_table(tmp_path / "n" / "trials.csv").set_index("config/arch")
    assert df.loc["resnet18", "status"] == "COMPLETED"
    for arch in ("resnet50", "resnet101"):
        assert df.loc[arch, "status"] == "ERROR" and df.loc[arch, "epochs"] == 0
        error = df.loc[arch, "error"]
        assert "TrialDoesNotFit: needs" in error and "the largest node has 1.8 GiB" in error
    failed = [t for t in _study_trials(tmp_path / "n") if t.state.name == "FAIL"]
    assert len(failed) == 2  # Optuna was told they failed

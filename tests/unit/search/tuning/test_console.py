"""The console a person watches: event lines, the status line (live on a terminal, a line in a log), the
final stage's epoch bars, a closed pipe, and the checkpoints kept for --resume."""
from __future__ import annotations

import io
import json
import sys
import time
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from search.tuning.budget import Clock, SearchBudget
from search.tuning.callbacks import SearchConsole
from search.tuning.cli import broken_pipe, run_cli
from search.tuning.console import Console, RunBars, Tally, clock_text, counted, show_progress, trial_summary
from search.tuning.storage import prune_checkpoints, saved_latest_checkpoints

CONFIG = {"arch": "convnet", "width": 32, "depth": 3, "optimizer": "adamw", "lr": 0.003, "lr_mode": "searched",
          "schedule": "onecycle", "batch_size": 128, "augment": "flip_crop", "dropout": 0.2}


def _trial(tid, status="RUNNING", epochs=None, acc=None, diverged=0, config=CONFIG):
    last = {} if epochs is None else {"training_iteration": epochs, "best_val_acc": acc, "objective": acc,
                                      "val_acc": acc, "diverged": diverged}
    return SimpleNamespace(trial_id=tid, status=status, config=config, last_result=last, path=None, error_file="")


def test_trial_summary_names_the_key_hyperparameters():
    assert trial_summary(CONFIG) == "convnet w32x3, adamw lr 0.003 onecycle, batch 128, flip_crop"
    ranged = {**CONFIG, "arch": "resnet18", "pretrained": True, "lr_mode": "range_test", "optimizer": "sgd"}
    assert trial_summary(ranged) == "resnet18 (ImageNet), sgd lr range test onecycle, batch 128, flip_crop"


def test_counted():
    assert (counted(1, "epoch"), counted(2, "seed"), counted(0, "configuration")) == (
        "1 epoch", "2 seeds", "0 configurations")


def test_clock_text():
    assert (clock_text(0), clock_text(65), clock_text(3725), clock_text(-3)) == ("0:00", "1:05", "1:02:05", "0:00")
    assert clock_text(59, hours=True) == "0:00:59"  # beside a budget of an hour or more


def test_a_log_gets_one_line_per_event_and_the_status_when_due():
    out = io.StringIO()
    console = Console(out, live=False, every=3600)
    console.event("trial a started")
    console.status("status 1")      # the first is printed at once
    console.status("status 2")      # not due yet
    console.status("status 3", force=True)
    console.close()
    assert out.getvalue().splitlines() == ["trial a started", "status 1", "status 3"]
    assert "\r" not in out.getvalue()


def test_a_terminal_gets_the_status_redrawn_in_place():
    out = io.StringIO()
    console = Console(out, live=True)
    console.status("[0:05 / 1:00:00] trials: 0 completed")
    console.event("trial a started")
    console.status("[0:06 / 1:00:00] trials: 1 completed")
    console.close()
    text = out.getvalue()
    assert "\r" in text and "trial a started\n" in text and "[0:06 / 1:00:00] trials: 1 completed" in text


def test_a_benchmark_tally_prints_each_run_and_how_many_are_left(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    out = io.StringIO()
    tally = Tally(3, "searches", stream=out)
    now[0] += 60
    tally.done("random seed 0: best 0.41")
    now[0] += 60
    tally.done("asha seed 0: best 0.43")
    tally.close()
    assert out.getvalue().splitlines() == ["[0:00] 0/3 searches done", "random seed 0: best 0.41",
                                           "[1:00] 1/3 searches done, ~2:00 left", "asha seed 0: best 0.43",
                                           "[2:00] 2/3 searches done, ~1:00 left"]


def _console(trials, budget=None, max_epochs=9, rungs=(1, 3)):
    out = io.StringIO()
    watch = SearchConsole(Console(out, live=False, every=0), max_epochs=max_epochs, rungs=list(rungs),
                          num_samples=6, budget=lambda: budget)
    watch.trials = trials
    return watch, out


def test_each_trial_event_is_one_line():
    done = _trial("aa", "TERMINATED", 9, 0.571)
    asha = _trial("bb", "TERMINATED", 3, 0.402)
    odd = _trial("cc", "TERMINATED", 2, 0.30)
    gone = _trial("dd", "TERMINATED", 4, 0.18, diverged=1)
    watch, out = _console([done, asha, odd, gone])
    watch.on_trial_start(0, [done], done)
    for t in (done, asha, odd, gone):
        watch.on_trial_complete(0, [done, asha, odd, gone], t)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("trial ")]
    assert lines == ["trial aa started: convnet w32x3, adamw lr 0.003 onecycle, batch 128, flip_crop",
                     "trial aa completed 9 epochs: PublicTest 57.1%",
                     "trial bb stopped by ASHA at rung 2 (epoch 3): PublicTest 40.2%",
                     "trial cc stopped after epoch 2: PublicTest 30.0%",
                     "trial dd diverged in epoch 4: PublicTest 18.0% before it"]


def test_a_failure_prints_its_reason_from_error_txt(tmp_path):
    (tmp_path / "error.txt").write_text("Traceback (most recent call last):\n  ...\nValueError: lr is nan\n")
    failed = _trial("ee", "ERROR", 1, 0.2)
    failed.path = str(tmp_path)
    watch, out = _console([failed])
    watch.on_trial_error(0, [failed], failed)
    assert "trial ee failed: ValueError: lr is nan" in out.getvalue().splitlines()


def test_the_status_counts_tunes_trials_and_says_when_the_final_stage_starts():
    trials = [_trial("aa", "TERMINATED", 9, 0.571), _trial("bb", "TERMINATED", 3, 0.60), _trial("cc"),
              _trial("dd", "ERROR", 1, 0.1), _trial("ee", "PENDING")]
    budget = SearchBudget(clock=Clock(3600, started=time.time() - 125), share=0.5, slots=2, top_k=2,
                          seeds=1, epochs=40, n_search=8612, n_full=28709, n_test=3589, ttas=2)
    watch, _ = _console(trials, budget)
    watch.on_trial_result(0, trials, trials[2], {"objective": 0.4, "time_this_iter_s": 9.0, "images_per_s": 900})
    text = watch.status_text()
    assert text.startswith("[0:02:05 / 1:00:00] trials: 1 completed, 1 running, 1 stopped, 1 failed (of 6)")
    assert "best 60.0% (bb)" in text and "final stage in ~" in text
    budget.stopped_at = 1.0
    assert watch.status_text().endswith("| final stage next")


def test_final_runs_show_one_line_per_epoch_in_a_log_and_bars_on_a_terminal():
    out = io.StringIO()
    bars = RunBars(out, live=False)
    show_progress({"run": "c1-seed1", "epoch": 1, "epochs": 2, "val_acc": 0.5}, bars)
    show_progress({"run": "c1-seed1", "note": "c1-seed1 re-planned from 2 to 1 epochs"}, bars)
    assert out.getvalue().splitlines() == ["c1-seed1 epoch 1/2: PublicTest accuracy 0.5000",
                                           "c1-seed1 re-planned from 2 to 1 epochs"]
    out = io.StringIO()
    bars = RunBars(out, live=True)
    for epoch in (1, 2):
        show_progress({"run": "c1-seed1", "epoch": epoch, "epochs": 2, "val_acc": 0.4 + epoch / 10}, bars)
    bars.note("final run c1-seed1: best PublicTest accuracy 0.6000")
    bars.close()
    text = out.getvalue()
    assert "\r" in text and "c1-seed1" in text and "2/2" in text and "PublicTest 0.6000" in text


def test_a_closed_pipe_ends_quietly():
    def wrapped(argv):
        try:
            raise BrokenPipeError(32, "Broken pipe")
        except BrokenPipeError as err:
            raise RuntimeError("Tune wrapped it") from err

    def other(argv):
        raise RuntimeError("not a pipe")

    assert broken_pipe(RuntimeError("x")) is False
    with pytest.raises(RuntimeError):
        run_cli(other)  # any other error still raises
    # run_cli points stdout at /dev/null; give it a stdout of its own to do that to.
    saved = sys.stdout
    with open("/dev/null", "w") as sink:
        sys.stdout = sink
        try:
            assert run_cli(wrapped) == 0
        finally:
            sys.stdout = saved


def _state(tune, latest):
    trial_data = [[json.dumps({"trial_id": tid}), json.dumps({"last_result": {"checkpoint_dir_name": ckpt}})]
                  for tid, ckpt in latest.items()]
    (tune / "experiment_state-2026-12-02_10-00-00.json").write_text(json.dumps({"trial_data": trial_data}))


def test_checkpoints_are_pruned_only_up_to_what_the_saved_state_names(tmp_path):
    tune = tmp_path / "tune"
    for tid, n in (("a", 3), ("b", 2), ("c", 1)):
        for i in range(n):
            (tune / f"trial_{tid}" / f"checkpoint_{i:06d}").mkdir(parents=True)
    fs = pafs.LocalFileSystem()
    assert saved_latest_checkpoints(fs, str(tune)) is None and prune_checkpoints(fs, str(tune)) == set()
    # the state was saved when a's latest was its second checkpoint, b's its second; c reported no checkpoint
    _state(tune, {"a": "checkpoint_000001", "b": "checkpoint_000001", "c": None})
    assert prune_checkpoints(fs, str(tune)) == {"b"}
    kept = {t: sorted(p.name for p in (tune / f"trial_{t}").iterdir()) for t in "abc"}
    assert kept == {"a": ["checkpoint_000001", "checkpoint_000002"], "b": ["checkpoint_000001"],
                    "c": ["checkpoint_000000"]}
    (tune / "experiment_state-2026-12-02_10-00-00.json").write_text('{"trial_data": [["{')  # mid-write
    assert prune_checkpoints(fs, str(tune), ["a"]) == set()

"""The search through the real CLI: on the demo data, and on a slice of the real FER2013."""
from __future__ import annotations

import glob
import json
import pickle
import re
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from search.tuning.cli import run_cli
from search.tuning.study import TRIAL_ATTR, load_study
from tests.helpers import N_DEMO, read_table, run_command, write_fer_csv
from trainables.metrics import METRIC


def _tb_tags(trial_dir):
    tags = set()
    for f in trial_dir.glob("events.out.tfevents.*"):
        for ev in EventFileLoader(str(f)).Load():
            tags.update(v.tag for v in ev.summary.value)
    return tags


@pytest.mark.slow
def test_trials_csv_has_one_row_per_trial(demo_experiment):
    exp, _ = demo_experiment
    df = read_table(exp / "trials.csv")
    assert len(df) == N_DEMO and df["trial_id"].is_unique
    for col in ["trial_id", "status", "val_acc", "epochs", "seconds", "node_id", "config/arch", "config/lr_mode",
                "config/optimizer", "config/augment", "config/batch_size", "config/weight_decay"]:
        assert col in df.columns, col
    assert set(df["status"]) <= {"COMPLETED", "STOPPED"}
    assert df["val_acc"].between(0, 1).all() and df["epochs"].between(1, 3).all()
    assert (df["seconds"] > 0).all() and df["node_id"].str.len().gt(10).all()
    assert df["objective"].is_monotonic_decreasing  # best first
    # what each model costs a user: measured once per trial, in ONNX Runtime
    assert (df["params"] > 1000).all() and (df["latency_ms"] > 0).all()
    assert (df["latency_runtime"] == "onnxruntime").all()
    widths = df.groupby("config/width")["params"].first()
    assert widths.is_monotonic_increasing  # a wider ConvNet (same depth) has more parameters


@pytest.mark.slow
def test_the_console_has_one_line_per_trial_event_and_none_of_rays(demo_experiment):
    """The demo search's output (a log, not a terminal): its header, a line per trial started and per
    trial ended as trials.csv records it, status lines without redraws, and nothing of Ray's own."""
    exp, r = demo_experiment
    out = r.stdout + r.stderr
    df = read_table(exp / "trials.csv")
    assert out.startswith(f"experiment {exp}: space convnet, {N_DEMO} trials of up to 3 epochs (ASHA at epochs 1)")
    for row in df.itertuples():
        assert re.search(rf"^trial {row.trial_id} started: convnet w\d+x\d, ", out, re.M), row.trial_id
        ended = ("completed 3 epochs" if row.status == "COMPLETED" else "stopped by ASHA at rung 1 (epoch 1)")
        assert f"trial {row.trial_id} {ended}: PublicTest {100 * row.val_acc:.1f}%" in out, (row.trial_id, out)
    done, stopped = (df["status"] == "COMPLETED").sum(), (df["status"] == "STOPPED").sum()
    last = rf"^\[\d+:\d\d\] trials: {done} completed, 0 running, {stopped} stopped, 0 failed \(of {N_DEMO}\) \| best "
    assert re.search(last, out, re.M), out
    assert "\r" not in out
    for noise in ("Checkpoint successfully created", "Trial status:", "started with configuration", "Traceback",
                  "Token authentication"):
        assert noise not in out, noise


@pytest.mark.slow
def test_asha_stops_trials_at_its_rungs(demo_experiment):
    exp, _ = demo_experiment
    df = read_table(exp / "trials.csv")
    stopped, completed = df[df["status"] == "STOPPED"], df[df["status"] == "COMPLETED"]
    assert len(stopped) >= 1 and len(completed) >= 1
    assert (stopped["epochs"] == 1).all() and (completed["epochs"] == 3).all()  # the only rung is epoch 1
    # Every decision replays ASHA's rule (reduction factor 3): in the order the trials reached the rung
    # (one at a time here), a trial stops when its objective is below the 2/3 quantile of the objectives
    # recorded there before it; the first one to arrive always goes on. (So a stopped trial may beat an
    # early one that went on: that one was judged against fewer.)
    at_rung = {tid: json.loads((exp / "tune" / f"trial_{tid}" / "result.json").read_text().splitlines()[0])
               for tid in df["trial_id"]}
    firsts = sorted((row["timestamp"], tid, row[METRIC]) for tid, row in at_rung.items())
    status = dict(zip(df["trial_id"], df["status"]))
    recorded: list[float] = []
    for _, tid, value in firsts:
        below = bool(recorded) and value < np.nanpercentile(recorded, (1 - 1 / 3) * 100)
        assert status[tid] == ("STOPPED" if below else "COMPLETED"), (tid, value, recorded)
        recorded.append(value)


@pytest.mark.slow
def test_known_good_configurations_run_first(demo_experiment):
    """The first trials of a search are its space's known-good configurations, exactly as written."""
    from functools import partial

    from search.tuning.warm_start import KNOWN_GOOD, replay
    from spaces import convnet

    exp, _ = demo_experiment
    with open(max(glob.glob(str(exp / "tune" / "searcher-state-*.pkl"))), "rb") as f:
        study = sorted(pickle.load(f)["_ot_study"].trials, key=lambda t: t.number)
    wanted = [replay(partial(convnet), c)[0] for c in KNOWN_GOOD["convnet"]]
    assert [t.params for t in study[:len(wanted)]] == wanted
    assert all(t.params != wanted[0] for t in study[len(wanted):])


@pytest.mark.slow
def test_warm_start_seeds_the_sampler_with_the_earlier_finished_trials(demo_experiment, demo_csvs, tmp_path):
    exp, _ = demo_experiment
    earlier = read_table(exp / "trials.csv")
    # The same data (warm-starting from other data or labels is refused), another fidelity (said so).
    r = run_command("search.run", "--space", "convnet", "--data", str(demo_csvs["bad"]), "--num-samples", "1",
                    "--max-epochs", "1",
                    "--grace-epochs", "1", "--train-fraction", "0.5", "--no-final", "--no-report", "--no-known-good",
                    "--warm-start", str(exp), "--results", str(tmp_path), "--name", "w", "--seed", "5")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"warm start: {len(earlier)} of {len(earlier)} finished trials of {exp}" in r.stdout
    assert "at another fidelity: --train-fraction 0.5 and --max-epochs 3 there, 0.5 and 1 here" in r.stdout
    refused = run_command("search.run", "--space", "convnet", "--data", "demo", "--num-samples", "1",
                          "--warm-start", str(exp), "--results", str(tmp_path), "--name", "w2", "--no-final")
    assert refused.returncode == 2 and "their accuracies are not comparable" in refused.stderr
    with open(max(glob.glob(str(tmp_path / "w" / "tune" / "searcher-state-*.pkl"))), "rb") as f:
        study = pickle.load(f)["_ot_study"].trials
    warm = [t for t in study if "warm_start" in t.user_attrs]
    assert sorted(t.value for t in warm) == sorted(earlier["objective"])
    assert {t.user_attrs["warm_start"] for t in warm} == {f"demo/{tid}" for tid in earlier["trial_id"]}
    assert len(study) == len(earlier) + 1 and len(read_table(tmp_path / "w" / "trials.csv")) == 1


@pytest.mark.slow
def test_warm_start_keeps_the_trials_that_fit_and_refuses_when_none_does(demo_experiment, demo_csvs, capsys):
    from search.run import main
    from search.tuning.warm_start import earlier_trials

    exp, _ = demo_experiment
    earlier = read_table(exp / "trials.csv")

    def small_only(trial):  # a space whose widths are a subset of the convnet space's
        trial.suggest_categorical("width", [16, 32])
        trial.suggest_int("depth", 2, 3)

    fit = earlier["config/width"].isin([16, 32]).sum()
    assert 0 < fit < len(earlier)  # the known-good trials are one of each
    trials, note = earlier_trials(exp, small_only, "small")
    assert len(trials) == fit and f"{fit} of {len(earlier)} finished trials" in note
    assert f"{len(earlier) - fit} do not fit the space 'small' and are left out" in note
    status = run_cli(main, ["--space", "resnet", "--data", str(demo_csvs["bad"]), "--warm-start", str(exp),
                            "--no-final", "--results", str(exp.parent), "--name", "other"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: --warm-start {exp}: none of its {len(earlier)} finished trials fits the space "
                          f"'resnet'"), err
    assert not (exp.parent / "other").exists()


@pytest.mark.slow
def test_optuna_asha_and_trials_csv_share_one_objective(demo_experiment):
    """Optuna's value of every finished trial, ASHA-stopped ones included, is its trials.csv objective:
    the best PublicTest accuracy over the epochs it ran (not its last epoch's)."""
    exp, _ = demo_experiment
    df = read_table(exp / "trials.csv")
    with open(max(glob.glob(str(exp / "tune" / "searcher-state-*.pkl"))), "rb") as f:
        study = pickle.load(f)["_ot_study"].trials
    assert len(study) == N_DEMO and all(t.state.name == "COMPLETE" for t in study)
    assert sorted(t.value for t in study) == sorted(df["objective"])
    assert (df["objective"] == df["val_acc"]).all()  # nothing diverged: the objective is the best epoch
    for tid in df["trial_id"]:
        rows = [json.loads(line) for line in (exp / "tune" / f"trial_{tid}" / "result.json").read_text().splitlines()]
        assert rows[-1]["objective"] == max(r["val_acc"] for r in rows)
        assert [r["objective"] for r in rows] == sorted(r["objective"] for r in rows)  # what ASHA compared
    assert df["objective"].is_monotonic_decreasing  # trials.csv is ranked by it


@pytest.mark.slow
def test_trials_ran_one_at_a_time(demo_experiment):
    exp, _ = demo_experiment
    spans = []
    for d in (exp / "tune").glob("trial_*"):
        rows = [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
        spans.append((rows[0]["timestamp"] - rows[0]["time_this_iter_s"], rows[-1]["timestamp"]))
    spans.sort()
    assert len(spans) == N_DEMO
    assert all(start >= end_before - 1 for (_, end_before), (start, _) in zip(spans, spans[1:])), spans


@pytest.mark.slow
def test_settings_json_is_the_resolved_settings(demo_experiment):
    exp, _ = demo_experiment
    s = json.loads((exp / "settings.json").read_text())
    assert s["space"] == "convnet" and s["num_samples"] == N_DEMO and s["max_epochs"] == 3 and s["name"] == "demo"
    # Placeholders resolved: the final stage's epochs, the GPUs a trial got, the trials at once.
    assert s["final_epochs"] == 3 and s["gpus_per_trial"] == 0 and s["max_concurrent"] == 1


@pytest.mark.slow
def test_every_trial_is_in_tensorboard(demo_experiment):
    exp, r = demo_experiment
    trial_dirs = [d for d in (exp / "tune").iterdir() if d.is_dir()]
    assert len(trial_dirs) == N_DEMO
    for d in trial_dirs:
        tags = _tb_tags(d)
        assert {"ray/tune/val_acc", "ray/tune/train_loss", "ray/tune/lr"} <= tags
        assert "_hparams_/session_start_info" in tags  # the trial's hyperparameters
    assert f"tensorboard --logdir {exp}" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("flag, value, was", [("--seed", "7", "--seed 43"), ("--max-epochs", "5", "--max-epochs 3"),
                                              ("--space", "resnet", "--space convnet"),
                                              ("--train-fraction", "1", "--train-fraction 0.5")])
def test_resume_refuses_changed_search_flags(demo_experiment, capsys, flag, value, was):
    from search.run import main

    exp, _ = demo_experiment
    args = {"--space": "convnet", "--data": "demo", "--num-samples": str(N_DEMO), "--max-epochs": "3",
            "--grace-epochs": "1", "--train-fraction": "0.5", "--seed": "43", flag: value}
    before = (exp / "trials.csv").read_text()
    status = run_cli(main, [*[x for kv in args.items() for x in kv], "--results", str(exp.parent), "--name", "demo",
                            "--no-final", "--resume"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: --resume must repeat") and f"{was} (now " in err, err
    assert (exp / "trials.csv").read_text() == before


@pytest.mark.slow
def test_an_older_experiment_with_schedules_in_epochs(demo_experiment, tmp_path, capsys):
    """An experiment from before schedule settings became fractions of the run (its Tune state rewritten
    to the old names): --resume refuses it in one line; its trials are read as fractions of its 3-epoch
    trials, with a note, and seed a new search's sampler through --warm-start."""
    import shutil

    from search.run import main
    from search.tuning.records import load_trials
    from search.tuning.warm_start import study_seed

    exp = tmp_path / "demo"
    shutil.copytree(demo_experiment[0], exp)
    for state in (exp / "tune").glob("experiment_state-*.json"):
        text = state.read_text().replace("warmup_fraction", "warmup_epochs").replace("patience_fraction",
                                                                                      "plateau_patience")
        state.write_text(text)
    before = (exp / "trials.csv").read_text()
    args = ["--space", "convnet", "--data", "demo", "--num-samples", str(N_DEMO), "--max-epochs", "3",
            "--grace-epochs", "1", "--train-fraction", "0.5", "--seed", "43", "--results", str(tmp_path),
            "--name", "demo", "--no-final", "--resume"]
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "older version (schedule settings in epochs)" in err and "\n" not in err
    assert (exp / "trials.csv").read_text() == before
    records = load_trials(exp, max_epochs=3)
    assert "is from an older version, with schedule settings in epochs" in capsys.readouterr().out
    plateau = [r.config for r in records if r.config.get("schedule") == "plateau"]
    assert plateau and all("plateau_patience" not in c and "patience_fraction" in c for c in plateau)
    assert all("warmup_epochs" not in r.config and "warmup_fraction" in r.config for r in records)
    seed = study_seed("convnet", ferplus=False, offer_weights=False, warm_start=str(exp), use_known_good=False)
    assert len(seed.trials) >= 1 and all("warmup_fraction" in t.params for t in seed.trials)


@pytest.mark.slow
def test_quick_start_path_with_time_budget_random_searcher_and_final_stage(tmp_path):
    """The path of the README's quick start: the final stage runs inside the search's own Ray instance.

    A 60 s budget for 40 trials and a final stage that wants 3 x 3 x 8 epochs: the search stops
    early enough to leave the final stage its time (not an interruption: exit 0, no resume
    hint), the final stage is cut to fit, and the whole command ends within the budget + 5%,
    as seen from outside the process, and says how it split the time.
    """
    budget = 60
    started = time.time()
    r = run_command("search.run", "--space", "convnet", "--data", "demo", "--num-samples", "40", "--max-epochs", "4",
                    "--grace-epochs", "1", "--time-budget", str(budget), "--searcher", "random",
                    "--train-fraction", "0.3", "--final-top-k", "3", "--final-seeds", "3", "--final-epochs", "8",
                    "--final-tta", "none", "--results", str(tmp_path), "--name", "q", "--seed", "3")
    wall = time.time() - started
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "--resume" not in r.stderr and "final results:" in r.stdout
    assert f"report: {tmp_path / 'q' / 'report.html'}" in r.stdout  # written within the budget too
    # time_budget.json is written before the report, so the report shows this run's split (it used to come after)
    assert "How --time-budget was split" in (tmp_path / "q" / "report.html").read_text()
    assert "search stopped by the time budget" in r.stdout
    exp = tmp_path / "q"
    split = json.loads((exp / "time_budget.json").read_text())
    assert split["total"] <= budget * 1.05 and wall <= budget * 1.05 + 2, (split, wall)
    assert min(split["startup"], split["search"], split["final"]) > 0
    assert abs(split["startup"] + split["search"] + split["final"] - split["total"]) < 1e-6
    assert re.search(rf"time budget {budget} s: start-up \d+ s, search \d+ s, final stage \d+ s", r.stdout)
    plan = split["plan"]
    assert plan["top_k"] * plan["seeds"] * plan["epochs"] < 3 * 3 * 8  # cut to fit
    df = read_table(exp / "trials.csv")
    assert 1 <= len(df) < 40 and df["val_acc"].notna().any()
    # optuna.db: the trials the budget stopped mid-run are finished there too, with trials.csv's objective.
    study = {t.user_attrs[TRIAL_ATTR]: t for t in load_study(exp).trials if TRIAL_ATTR in t.user_attrs}
    # (One the budget stopped before its first epoch has no objective: pruned.)
    assert sorted(study) == sorted(df["trial_id"])
    for row in df.itertuples():
        t = study[row.trial_id]
        assert (t.state.name, t.value) == (("COMPLETE", pytest.approx(row.objective)) if row.objective == row.objective
                                           else ("PRUNED", None)), (row, t)
    metrics = read_table(exp / "final" / "metrics.csv")
    assert set(metrics["kind"]) == {"run", "mean", "std", "ensemble_all", "ensemble_best"}
    assert len(metrics[metrics["kind"] == "run"]) == plan["top_k"] * plan["seeds"]
    with open(max(glob.glob(str(exp / "tune" / "searcher-state-*.pkl"))), "rb") as f:
        sampler = pickle.load(f)["_ot_study"].sampler
    assert type(sampler).__name__ == "RandomSampler"


def _ferplus_files(tmp_path):
    """A small fer2013.csv and its fer2013new.csv: Training rows 0-69, PublicTest 70-90, PrivateTest 91-111.

    Row r votes 8 for emotion r % 8, except every 10th row, whose top vote is not-a-face (dropped).
    """
    data = write_fer_csv(tmp_path / "fer2013.csv")
    usage = [line.rsplit(",", 1)[1] for line in data.read_text().splitlines()[1:]]
    lines = ["Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"]
    for r, u in enumerate(usage):
        votes = [0] * 10
        votes[9 if r % 10 == 0 else r % 8] = 8
        votes[(r + 1) % 8] += 2
        lines.append(f"{u},fer{r:07d}.png," + ",".join(map(str, votes)))
    (tmp_path / "fer2013new.csv").write_text("\n".join(lines) + "\n")
    kept = {split: sum(1 for r, u in enumerate(usage) if u == split and r % 10) for split in set(usage)}
    return data, kept


@pytest.mark.slow
def test_ferplus_labels_through_the_cli(tmp_path):
    data, kept = _ferplus_files(tmp_path)
    r = run_command("search.run", "--space", "convnet", "--data", str(data), "--labels", "ferplus",
                    "--num-samples", "1", "--max-epochs", "1", "--grace-epochs", "1", "--no-final",
                    "--results", str(tmp_path / "r"), "--name", "fp", "--seed", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(rf"{kept['Training']} Training images( \(\d+%\))?, {kept['PublicTest']} PublicTest images",
                     r.stdout), r.stdout
    assert kept["PublicTest"] == 18  # 21 rows, 3 of them not faces
    assert "report: " in r.stdout and "not written" not in r.stderr  # 8 classes in the report's figures
    df = read_table(tmp_path / "r" / "fp" / "trials.csv")
    assert len(df) == 1 and df["status"].iloc[0] == "COMPLETED" and "config/soft_labels" in df.columns
    assert json.loads((tmp_path / "r" / "fp" / "settings.json").read_text())["labels"] == "ferplus"


@pytest.mark.slow
def test_max_latency_ms_trains_no_trial_over_it(tmp_path):
    """A limit no model meets: every trial is measured and left untrained (OVER_LATENCY in trials.csv, the
    console says why), and the final stage then has nothing to retrain (one line, exit 2)."""
    r = run_command("search.run", "--space", "convnet", "--data", "demo", "--num-samples", "2", "--max-epochs", "2",
                    "--grace-epochs", "1", "--max-latency-ms", "0.0001", "--final-top-k", "1", "--final-seeds", "1",
                    "--results", str(tmp_path / "r"), "--name", "fast", "--no-report")
    df = read_table(tmp_path / "r" / "fast" / "trials.csv")
    assert len(df) == 2 and (df["status"] == "OVER_LATENCY").all() and (df["latency_ms"] > 0.0001).all()
    assert df["val_acc"].isna().all() and (df["objective"] == 0).all()
    assert r.stdout.count("not trained:") == 2 and "over --max-latency-ms 0.0001" in r.stdout
    assert r.returncode == 2 and "no trial of" in r.stderr and "Traceback" not in r.stderr


def test_unreachable_address_is_one_line(tmp_path, capsys):
    from search.run import main

    status = run_cli(main, ["--space", "convnet", "--data", "demo", "--address", "127.0.0.1:1",
                            "--results", str(tmp_path / "r"), "--name", "x"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: cannot reach the Ray cluster at 127.0.0.1:1"), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_search_on_real_fer2013(tmp_path, real_fer_csv):
    # Seed 77: TPE's first draws are small ConvNets (Adam at 2.7e-3; AdamW with mixup) that learn fast.
    r = run_command("search.run", "--space", "convnet", "--data", str(real_fer_csv), "--train-fraction", "0.2",
                "--num-samples", "2", "--max-epochs", "2", "--scheduler", "fifo", "--seed", "77", "--no-known-good",
                "--results", str(tmp_path), "--name", "real", "--no-final")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "report: " in r.stdout and "not written" not in r.stderr  # the search's report, on real faces
    df = read_table(tmp_path / "real" / "trials.csv")
    assert len(df) == 2 and df["val_acc"].between(0, 1).all()
    assert df["val_acc"].max() > 0.30  # PublicTest's majority class (happy) is 24.9%
    n_train = int(re.search(r"(\d+) Training images \(\d+%\), 3589 PublicTest images", r.stdout).group(1))
    assert abs(n_train - 5742) <= 4  # a stratified 20% of Training's 28,709


@pytest.mark.slow
def test_range_test_never_costs_more_than_a_tenth_of_the_trial(tmp_path):
    """The issue's reproduction: batch 256, range test, on 141 demo images for 1 epoch (reported with a
    DenseNet-121; the bound does not depend on the model, so ConvNets show it, seed 2 drawing two
    range-tested trials at batch 256, in half the DenseNets' 28 s).

    Before the bound the test's floor of 30 steps made it see 7,680 images (54 epochs of the
    trial's data); now it may see 10% of 141 and is skipped for the default rate, saying so.
    """
    r = run_command("search.run", "--space", "convnet", "--seed", "2", "--no-known-good", "--data", "demo",
                    "--train-fraction", "0.1",
                    "--num-samples", "2", "--max-epochs", "1", "--grace-epochs", "1", "--no-final", "--no-report",
                    "--results", str(tmp_path), "--name", "d")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    n_train = int(re.search(r"(\d+) Training images", r.stdout).group(1))
    df = read_table(tmp_path / "d" / "trials.csv")
    tested = df[df["config/lr_mode"] == "range_test"]
    assert len(tested) == 2 and set(df["status"]) == {"COMPLETED"} and (df["config/batch_size"] == 256).all()
    assert (tested["range_test_images"] <= 0.1 * n_train * 1).all()
    assert tested["range_test_note"].str.contains("skipped").all() and (tested["found_lr"] > 0).all()

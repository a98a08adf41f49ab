"""The final stage: the real `search.run` -> `search.final` -> `search.evaluate` CLIs on the demo data.

The shared demo search (tests/conftest.py) runs on a CSV whose PrivateTest rows are garbage: that
it succeeds proves the search never reads PrivateTest, and `search.final` on the same file must
fail naming the bad line. The shared final stage runs for real on a copy of that experiment with
`--data` pointing at the intact twin of the file (same Training and PublicTest, plus PrivateTest
images copied from Training and PublicTest to count as duplicates).
"""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch

import search.evaluate
import search.final
from search.final_stage.retrain import retrain, without_test
from search.serving.deploy import load_classifier
from tests.helpers import DEMO_SEED, DEMO_SIZES, N_DEMO, N_DUP_PUBLIC, N_DUPLICATES, as_command, read_table, run_command
from trainables.data import EMOTIONS, SPLITS, load_fer2013, make_demo
from trainables.errors import UserError
from trainables.inference import predict
from trainables.models import build_model
from trainables.weights import load_weights, save_weights

evaluate_main = as_command(search.evaluate.main)
final_main = as_command(search.final.main)

SIZES = DEMO_SIZES
RUNS = [f"seed{DEMO_SEED + 1}", f"seed{DEMO_SEED + 2}"]  # --final-seeds 2: --seed+1, --seed+2, never the search's own


@pytest.fixture(scope="module")
def experiment(demo_experiment, demo_final, demo_csvs):
    """The shared demo search on `bad.csv` (garbage PrivateTest; `good.csv` is the intact twin), and the copy of
    it that holds the shared final stage (`exp`)."""
    return {"root": demo_csvs["root"], "exp": demo_final[0], "search": demo_experiment[1]}


@pytest.fixture(scope="module")
def final_dir(demo_final):
    """The shared final stage (conftest.demo_final): 1 configuration x 2 seeds x 1 epoch, TTA none, flip, tencrop."""
    exp, r = demo_final
    assert "PrivateTest" in r.stdout and "ensemble_all" in r.stdout  # the table is printed
    # Each run's epochs reach the driver's console (a log here: one line per epoch), before its result.
    for seed in RUNS:
        epoch = r.stdout.index(f"-{seed} epoch 1/1: PublicTest accuracy ")
        assert epoch < r.stdout.index(f"-{seed}: best PublicTest accuracy "), r.stdout
    assert "\r" not in r.stdout and "Checkpoint successfully" not in r.stdout + r.stderr
    return exp / "final"


def _one_line_error(r) -> str:
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


# --------------------------------------------------------------------------- the protocol guard

@pytest.mark.slow
def test_search_never_reads_private_test_but_final_does(experiment):
    search = experiment["search"]
    assert search.returncode == 0, search.stderr[-3000:]
    trials = read_table(experiment["exp"] / "trials.csv")
    assert len(trials) == N_DEMO and trials["val_acc"].between(0, 1).all()
    # The final stage reads PrivateTest and so meets the garbage: the first PrivateTest row is
    # data row 1750, line 1752 of the file (after the header).
    first_line = SIZES["Training"] + SIZES["PublicTest"] + 2
    models = experiment["exp"] / "final" / "models"
    had_models = models.exists()  # the end-to-end tests may have run first (pytest -k, -p randomly)
    message = _one_line_error(run_command("search.final", str(experiment["exp"]), "--final-top-k", "1",
                                      "--final-seeds", "1", "--final-epochs", "1", "--overwrite"))
    assert f"line {first_line}" in message and "bad.csv" in message
    assert models.exists() == had_models  # it failed before clearing or training anything


# --------------------------------------------------------------------------- search.final end to end

OUTPUTS = ["metrics.csv", "per_class.csv", "confusion_matrix.csv", "confusion_matrix.png", "confused_pairs.csv",
           "misclassified.csv", "misclassified.png", "reliability.png", "kernels.png", "activations.png", "README.md",
           "export/best_single.onnx", "export/best_ensemble.onnx", "export/best_distilled.onnx"]


@pytest.mark.slow
def test_final_writes_every_output(final_dir):
    for name in OUTPUTS:
        assert (final_dir / name).is_file() and (final_dir / name).stat().st_size > 0, name
    for name in ("confusion_matrix.png", "misclassified.png", "kernels.png", "activations.png"):
        assert (final_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weights = sorted(p.name for p in (final_dir / "models").glob("*.pt"))
    runs = [w for w in weights if not w.startswith("distilled-")]
    assert len(runs) == 2 and [w.split("-")[-1] for w in runs] == [f"{s}.pt" for s in RUNS]
    assert len(weights) == 3  # and the distilled student
    # the exported best single run classifies as its weights do, with its temperature
    single = load_classifier(final_dir / "export" / "best_single.onnx")
    chosen = final_dir / "models" / f"{single.meta['model']}.pt"
    crops = np.random.default_rng(0).integers(0, 256, (16, 48, 48), dtype=np.uint8)
    assert np.abs(single(crops) - load_classifier(chosen)(crops)).max() < 1e-4
    assert single.meta["temperature"] == pytest.approx(torch.load(chosen, weights_only=True)["temperature"])
    assert len(load_classifier(final_dir / "export" / "best_ensemble.onnx").meta["members"]) in (1, 2)
    # the distilled student: one network, exported as its weights classify, started from the best run and
    # taught by both runs (one configuration: ensemble_all)
    student = load_classifier(final_dir / "export" / "best_distilled.onnx")
    student_pt = final_dir / "models" / f"{student.meta['model']}.pt"
    assert student.meta["model"].startswith("distilled-top1-") and len(student.meta["members"]) == 1
    assert np.abs(student(crops) - load_classifier(student_pt)(crops)).max() < 1e-4
    info = json.loads(student_pt.with_suffix(".json").read_text())
    assert info["started_from"] == single.meta["model"] and sorted(info["distilled_from"]) == sorted(
        w[:-3] for w in runs)
    assert info["config"]["soft_labels"] and info["config"]["schedule"] == "cosine"
    assert len(info["history"]) == 2  # a quarter of the runs' one epoch, at least two
    for w in weights:
        assert (final_dir / "models" / w).with_suffix(".json").is_file()
        events = list((final_dir / "tensorboard" / w[:-3]).glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0


@pytest.mark.slow
def test_metrics_csv_rows_and_numbers(final_dir):
    df = read_table(final_dir / "metrics.csv")
    ttas = ["none", "flip", "tencrop"]
    counts = df.groupby(["kind", "tta"]).size()
    for tta in ttas:
        assert counts["run", tta] == 2 and counts["mean", tta] == 1 and counts["std", tta] == 1
        assert counts["ensemble_all", tta] == 1 and counts["ensemble_best", tta] == 1
        assert counts["distilled", tta] == 1
    rates = ["accuracy", "precision_macro", "recall_macro", "fbeta_macro", "precision_weighted", "recall_weighted",
             "fbeta_weighted", "top2_accuracy", "top3_accuracy", "accuracy_dedup", "val_acc"]
    scored = df[df["kind"] != "std"]
    assert scored[rates].notna().all().all() and ((scored[rates] >= 0) & (scored[rates] <= 1)).all().all()
    assert (scored["accuracy"] <= scored["top2_accuracy"] + 1e-9).all()
    assert (scored["top2_accuracy"] <= scored["top3_accuracy"] + 1e-9).all()
    assert (df["n_images"] == SIZES["PrivateTest"]).all()
    assert (df["n_dup_training"] == N_DUPLICATES).all() and (df["n_dup_publictest"] == N_DUP_PUBLIC).all()
    assert (df["n_duplicates"] == N_DUPLICATES + N_DUP_PUBLIC).all()
    runs = df[df["kind"] == "run"]
    for tta in ttas:
        mean = df[(df["kind"] == "mean") & (df["tta"] == tta)].iloc[0]
        std = df[(df["kind"] == "std") & (df["tta"] == tta)].iloc[0]
        accs = runs[runs["tta"] == tta]["accuracy"]
        assert mean["accuracy"] == pytest.approx(accs.mean()) and std["accuracy"] == pytest.approx(accs.std(ddof=1))
    # One configuration: the best-per-configuration ensemble is its best run by PublicTest.
    plain = runs[runs["tta"] == "none"]
    best = plain.loc[plain["val_acc"].idxmax()]
    ens_best = df[(df["kind"] == "ensemble_best") & (df["tta"] == "none")].iloc[0]
    assert ens_best["accuracy"] == pytest.approx(best["accuracy"])
    # Each run trained at its trial's rate: the one its range test found, or the searched one.
    trials = read_table(experiment_dir(final_dir) / "trials.csv").set_index("trial_id")
    for row in runs.itertuples():
        trial = trials.loc[row.trial_id]
        rate = trial["found_lr"] if trial["config/lr_mode"] == "range_test" else trial["config/lr"]
        assert row.lr == pytest.approx(rate)
    # Reloaded weights score PublicTest exactly as the training run did at its kept epoch.
    for row in plain.itertuples():
        meta = json.loads((final_dir / "models" / f"{row.config}-seed{int(row.seed)}.json").read_text())
        assert row.val_acc == pytest.approx(meta["val_acc"], abs=1e-6)
        assert meta["val_acc"] == pytest.approx(max(h["val_acc"] for h in meta["history"]))
        # the temperature the weights carry is the one metrics.csv reports (fitted on PublicTest, no TTA)
        assert row.temperature == pytest.approx(meta["temperature"], rel=1e-6)
    # Calibration columns: a temperature per model, ECE and Brier in their ranges
    cal = scored[["temperature", "ece", "ece_calibrated", "nll", "nll_calibrated", "brier", "brier_calibrated"]]
    assert cal.notna().all().all() and (cal["temperature"] > 0).all()
    assert ((cal[["ece", "ece_calibrated"]] >= 0) & (cal[["ece", "ece_calibrated"]] <= 1)).all().all()
    assert ((cal[["brier", "brier_calibrated"]] >= 0) & (cal[["brier", "brier_calibrated"]] <= 2)).all().all()


def experiment_dir(final_dir):
    return final_dir.parent


@pytest.mark.slow
def test_per_class_and_confusion_tables_add_up(final_dir):
    per_class = read_table(final_dir / "per_class.csv")
    assert (per_class.groupby(["model", "tta"])["support"].sum() == SIZES["PrivateTest"]).all()
    assert len(per_class.groupby(["model", "tta"])) == 5 * 3  # 2 runs + 2 ensembles + the student, 3 TTA modes
    cm = read_table(final_dir / "confusion_matrix.csv")
    classes = list(EMOTIONS)
    model = cm["model"].iloc[0]
    assert (cm["model"] == model).all() and model in (final_dir / "README.md").read_text()
    # The analysed model is the best by PublicTest without TTA, single runs before ensembles (and the student)
    # on a tie.
    metrics = read_table(final_dir / "metrics.csv")
    metrics["model"] = np.where(metrics["kind"] == "run",
                                metrics["config"] + "-seed" + metrics["seed"].astype("Int64").astype(str),
                                metrics["kind"])
    scored = metrics[metrics["kind"].isin(["run", "ensemble_all", "ensemble_best", "distilled"])]
    plain = scored[scored["tta"] == "none"]
    assert model == plain.loc[plain["val_acc"].idxmax(), "model"]
    for tta, block in cm.groupby("tta"):
        counts = block[block["value"] == "count"][classes].to_numpy()
        shares = block[block["value"] == "share"][classes].to_numpy()
        assert counts.sum() == SIZES["PrivateTest"]
        np.testing.assert_allclose(shares.sum(1)[counts.sum(1) > 0], 1.0)
        row = scored[(scored["model"] == model) & (scored["tta"] == tta)]
        assert len(row) == 1 and np.trace(counts) / counts.sum() == pytest.approx(row["accuracy"].iloc[0])
    none = cm[(cm["tta"] == "none") & (cm["value"] == "count")][classes].to_numpy()
    pairs = read_table(final_dir / "confused_pairs.csv")
    wrong = read_table(final_dir / "misclassified.csv")
    assert pairs["count"].sum() == len(wrong) == none.sum() - np.trace(none)
    assert list(pairs["count"]) == sorted(pairs["count"], reverse=True)
    assert (pairs["share_of_true"].between(0, 1)).all()
    assert list(wrong["confidence"]) == sorted(wrong["confidence"], reverse=True)
    assert (wrong["true"] != wrong["predicted"]).all()
    first_private = SIZES["Training"] + SIZES["PublicTest"]
    assert wrong["row"].between(first_private, first_private + SIZES["PrivateTest"] - 1).all()


@pytest.mark.slow
def test_saved_weights_load_with_weights_only(final_dir):
    path = sorted((final_dir / "models").glob("*.pt"))[0]
    ckpt = torch.load(path, weights_only=True)
    assert {"state_dict", "config", "classes", "num_classes"} <= set(ckpt)
    assert ckpt["num_classes"] == len(ckpt["classes"]) == 7
    assert json.loads(path.with_suffix(".json").read_text())["config"] == ckpt["config"]


@pytest.mark.slow
def test_evaluate_cli_prints_the_same_numbers(final_dir, experiment):
    path = sorted((final_dir / "models").glob("top*.pt"))[0]
    r = run_command("search.evaluate", "--model", str(path), "--data", str(experiment["root"] / "good.csv"),
                "--tta", "none", "flip")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_table(final_dir / "metrics.csv")
    run = metrics[(metrics["kind"] == "run") & (metrics["seed"] == int(path.stem.rsplit("seed", 1)[1]))]
    printed = {line.split()[1]: line.split() for line in r.stdout.splitlines() if line.startswith("PrivateTest ")}
    header = next(line.split() for line in r.stdout.splitlines() if line.split()[:2] == ["split", "tta"])
    for tta in ("none", "flip"):
        value = float(printed[tta][header.index("accuracy")])
        assert value == pytest.approx(run[run["tta"] == tta]["accuracy"].iloc[0], abs=1e-4)
    assert "most confused pairs" in r.stdout


@pytest.mark.slow
def test_final_refuses_to_overwrite_without_flag(final_dir, experiment, capsys):
    assert final_main([str(experiment["exp"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--overwrite" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- pieces, without Ray

def test_bad_weights_file_is_one_line_error(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    for path in (junk, foreign, tmp_path / "missing.pt"):
        assert evaluate_main(["--model", str(path), "--data", "demo"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and str(path) in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_training_tasks_are_handed_no_private_test(final_dir):
    # What the real tasks of the final stage received, as each recorded it beside its weights.
    for meta in (final_dir / "models").glob("*.json"):
        assert json.loads(meta.read_text())["trained_on"] == ["PublicTest", "Training"], meta.name
    # And a task handed PrivateTest refuses to train.
    full = make_demo(splits=SPLITS, n_train=14, n_val=7, n_test=7)
    with pytest.raises(ValueError, match="may see only"):
        retrain({"width": 8}, full, epochs=1, seed=0)
    data = without_test(full)
    assert set(data.splits) == {"Training", "PublicTest"}
    with pytest.raises(UserError, match="PrivateTest"):
        data.test


@pytest.mark.slow
def test_final_overwrite_with_resource_overrides(final_dir, experiment, tmp_path):
    """--overwrite replaces an earlier final stage entirely; flags given override settings.json (--ema-fraction
    too: the search ran without it, this stage retrains keeping the averaged weights)."""
    exp = tmp_path / "X"
    shutil.copytree(experiment["exp"], exp)
    r = run_command("search.final", str(exp), "--data", str(experiment["root"] / "good.csv"), "--overwrite",
                    "--final-top-k", "1", "--final-seeds", "1", "--final-epochs", "1", "--final-tta", "none",
                    "--cpus-per-trial", "1", "--gpus-per-trial", "0", "--no-report", "--ema-fraction", "0.1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 1 seed for 1 epoch on" in r.stdout and "(1 CPU, 0.0 GPU each)" in r.stdout
    weights = sorted(p.name for p in (exp / "final" / "models").glob("*.pt"))
    assert len(weights) == 1 and weights[0].endswith(f"-{RUNS[0]}.pt")  # the earlier second seed's run is gone
    _, meta = load_weights(exp / "final" / "models" / weights[0])
    assert meta["config"]["ema_fraction"] == 0.1
    metrics = read_table(exp / "final" / "metrics.csv")
    assert set(metrics["tta"]) == {"none"} and (metrics[metrics["kind"] == "run"]["seed"] == DEMO_SEED + 1).all()


@pytest.mark.slow
def test_evaluate_split_and_beta(final_dir, experiment, capsys):
    from sklearn.metrics import fbeta_score

    path = sorted((final_dir / "models").glob("*.pt"))[0]
    good = str(experiment["root"] / "good.csv")
    assert evaluate_main(["--model", str(path), "--data", good, "--split", "PublicTest", "--beta", "2",
                          "--tta", "none"]) == 0
    out = capsys.readouterr().out
    assert f"PublicTest ({SIZES['PublicTest']} images, beta=2)" in out
    header = next(line.split() for line in out.splitlines() if line.split()[:2] == ["split", "tta"])
    row = next(line.split() for line in out.splitlines() if line.startswith("PublicTest none"))
    model, _ = load_weights(path)
    val = load_fer2013(good, splits=["PublicTest"]).val
    pred = predict(model, val.x).numpy().argmax(1)
    expected = fbeta_score(val.y.numpy(), pred, beta=2, average="macro", labels=list(range(7)), zero_division=0)
    assert float(row[header.index("fbeta_macro")]) == pytest.approx(expected, abs=1e-4)
    assert "accuracy_dedup" in header  # duplicates of Training are counted on PublicTest too


def test_evaluate_refuses_a_model_with_another_class_count(tmp_path, capsys):
    model = build_model("convnet", num_classes=8, width=8, depth=2)
    path = save_weights(tmp_path / "ferplus", model.state_dict(), config={"width": 8, "depth": 2},
                        classes=[f"c{i}" for i in range(8)])
    assert evaluate_main(["--model", str(path), "--data", "demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "predicts 8 classes but demo has 7" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_final_alone_within_a_time_budget(experiment, tmp_path):
    """`search.final --time-budget`: the stage is planned from the search's epoch times and ends in time."""
    exp = tmp_path / "X"
    shutil.copytree(experiment["exp"], exp, ignore=shutil.ignore_patterns("final"))
    # start-up (5-7 s here) + a run's start + one epoch (about 5 s on the 1,400 demo images) + the reserve for
    # scoring, the ONNX exports and the report (about 25 s on the demo data): 35 s left no epoch
    budget = 45
    started = time.time()
    r = run_command("search.final", str(exp), "--data", str(experiment["root"] / "good.csv"), "--final-top-k", "2",
                    "--final-seeds", "3", "--final-epochs", "500", "--final-tta", "none", "--time-budget", str(budget))
    wall = time.time() - started
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "final stage within the time budget" in r.stdout and f"time budget {budget} s:" in r.stdout
    assert f"report: {exp / 'report.html'}" in r.stdout  # the report is part of the stage's time
    assert wall <= budget * 1.05 + 2, wall
    runs = read_table(exp / "final" / "metrics.csv").query("kind == 'run'")
    assert len(runs) >= 1 and (runs["best_epoch"] < 500).all()  # cut to fit

"""Bad input through the real CLI: one line on stderr, exit status 2, no traceback, nothing written."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import as_command, run_command, write_fer_csv

PIX = " ".join(["0"] * 2304)


def _csv(tmp_path, body: str):
    p = tmp_path / "bad.csv"
    p.write_text(body)
    return str(p)


def _folder(tmp_path, *, extra: str):
    from PIL import Image

    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for emo in ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"):
            d = root / split / emo
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("L", (48, 48), color=i * 40).save(d / f"{i}.png")
    if extra == "non_image":
        (root / "train" / "happy" / "notes.txt").write_text("not an image")
    else:
        (root / "train" / "contempt").mkdir()
        Image.new("L", (48, 48)).save(root / "train" / "contempt" / "0.png")
    return str(root)


def _good(tmp_path):
    return str(write_fer_csv(tmp_path / "good.csv"))


def _with_line(tmp_path, line: str):
    """A valid small fer2013.csv with one bad row appended (its line number is 2 + 112 = 114)."""
    return str(write_fer_csv(tmp_path / "bad.csv", lines=[line]))


CASES = {
    "missing file": (lambda t: "/nonexistent/fer2013.csv", [], "/nonexistent/fer2013.csv does not exist"),
    "empty file": (lambda t: _csv(t, ""), [], "bad.csv is empty"),
    "binary garbage": (lambda t: (t / "bad.csv").write_bytes(bytes(range(256)) * 40) and str(t / "bad.csv"), [],
                       "binary data"),
    "missing column": (lambda t: _csv(t, f"emotion,pixels\n0,{PIX}\n"), [], "header must be"),
    "2303 pixels": (lambda t: _with_line(t, "0," + " ".join(["0"] * 2303) + ",Training"), [],
                    "line 114: 2303 pixel values"),
    "label 7": (lambda t: _with_line(t, f"7,{PIX},Training"), [], "line 114: emotion '7' is not valid"),
    "label -1": (lambda t: _with_line(t, f"-1,{PIX},Training"), [], "line 114: emotion '-1' is not valid"),
    "non-numeric pixel": (lambda t: _with_line(t, "0,x" + " 0" * 2303 + ",Training"), [],
                          "line 114: pixel value 'x' is not an integer"),
    "unknown usage": (lambda t: _with_line(t, f"0,{PIX},Validation"), [], "line 114: Usage 'Validation'"),
    "empty split": (lambda t: _csv(t, f"emotion,pixels,Usage\n0,{PIX},Training\n1,{PIX},PrivateTest\n"), [],
                    "PublicTest"),
    "non-image file": (lambda t: _folder(t, extra="non_image"), [], "notes.txt"),
    "unknown emotion folder": (lambda t: _folder(t, extra="unknown_emotion"), [], "contempt"),
    "unknown space": (_good, ["--space", "vit"], "unknown space 'vit'"),
    "zero samples": (_good, ["--num-samples", "0"], "--num-samples"),
    "grace above max": (_good, ["--grace-epochs", "5", "--max-epochs", "2"], "--grace-epochs"),
    "train fraction 0": (_good, ["--train-fraction", "0"], "--train-fraction"),
    "train fraction 1.5": (_good, ["--train-fraction", "1.5"], "--train-fraction"),
    "not a number": (_good, ["--num-samples", "many"], "--num-samples"),
    "final share 1": (_good, ["--final-share", "1"], "--final-share must be in (0, 1)"),
    "warm start from nothing": (_good, ["--warm-start", "/nonexistent"],
                                "--warm-start /nonexistent is not an experiment folder"),
    "recipe only without known-good": (_good, ["--recipe-only", "--no-known-good"], "drop --no-known-good"),
    "recipe only with a warm start": (_good, ["--recipe-only", "--warm-start", "/nonexistent"],
                                      "--recipe-only runs no search for --warm-start"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(tmp_path, case, capsys):
    from search.run import main

    make, flags, needle = CASES[case]
    data = make(tmp_path)
    results = tmp_path / "results"
    args = ["--space", "convnet", *flags] if "--space" not in flags else flags
    status = as_command(main)([*args, "--data", data, "--results", str(results), "--name", "x", "--no-final"])
    out, err = capsys.readouterr()
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0]
    assert "Traceback" not in err + out
    assert not results.exists() or not any(results.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--num-samples", "many"], ["--space", "vit"], ["--data", "/nonexistent.csv"]])
def test_bad_input_through_python_m(tmp_path, args):
    """The same one line from the real `python -m search.run` process (argparse's and ours)."""
    full = ["--space", "convnet", *args] if "--space" not in args else [*args, "--data", "demo"]
    r = run_command("search.run", *full, "--results", str(tmp_path / "r"), "--name", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpus_without_gpu(tmp_path):
    r = run_command("search.run", "--space", "convnet", "--data", _good(tmp_path), "--gpus-per-trial", "1",
                "--results", str(tmp_path / "r"), "--name", "x")
    assert r.returncode == 2 and "no GPU" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_existing_experiment_is_never_overwritten(tmp_path):
    exp = tmp_path / "results" / "x"
    exp.mkdir(parents=True)
    (exp / "trials.csv").write_text("trial_id,val_acc\na,0.5\n")
    r = run_command("search.run", "--space", "convnet", "--data", _good(tmp_path),
                    "--results", str(tmp_path / "results"), "--name", "x")
    assert r.returncode == 2 and "already exists" in r.stderr and "--resume" in r.stderr
    assert (exp / "trials.csv").read_text() == "trial_id,val_acc\na,0.5\n"
    r = run_command("search.run", "--space", "convnet", "--data", "demo", "--results", str(tmp_path / "results"),
                "--name", "y", "--resume")
    assert r.returncode == 2 and "nothing to resume" in r.stderr

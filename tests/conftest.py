"""Shared fixtures: the real FER2013 CSV (written once from the shared copy), the demo data as CSVs, a finished
demo search and its final stage, one CPU thread."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import DEMO_SEED, N_DEMO, N_DUP_PUBLIC, N_DUPLICATES, SHARED_FER, run_command
from trainables.data import SPLITS, make_demo


@pytest.fixture(scope="session")
def real_fer_csv(tmp_path_factory):
    """The exact Kaggle fer2013.csv, written by the shared `to_csv.py`; skipped where the copy is absent."""
    if not (SHARED_FER / "fer2013.npz").exists():
        pytest.skip(f"real FER2013 not found at {SHARED_FER} (see its README)")
    out = tmp_path_factory.mktemp("fer2013") / "fer2013.csv"
    subprocess.run([sys.executable, str(SHARED_FER / "to_csv.py"), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def demo_csvs(tmp_path_factory) -> dict:
    """The demo data as Kaggle CSVs: `bad.csv`, whose PrivateTest rows are garbage (a search that succeeds on
    it never read them), and `good.csv`, its intact twin whose PrivateTest holds N_DUPLICATES copies of
    Training images and N_DUP_PUBLIC of PublicTest images. Training and PublicTest are `--data demo`'s own."""
    root = tmp_path_factory.mktemp("demo_csv")
    demo = make_demo(splits=SPLITS)
    for name, garbage in (("bad.csv", True), ("good.csv", False)):
        if not garbage:  # exact copies, as FER2013 has across splits
            demo.test.x[:N_DUPLICATES] = demo.train.x[:N_DUPLICATES]
            demo.test.x[N_DUPLICATES:N_DUPLICATES + N_DUP_PUBLIC] = demo.val.x[:N_DUP_PUBLIC]
        lines = ["emotion,pixels,Usage"]
        for usage in SPLITS:
            split = demo.splits[usage]
            for x, y in zip(split.x.reshape(len(split), -1).numpy(), split.y.numpy()):
                pixels = "garbage" if garbage and usage == "PrivateTest" else " ".join(map(str, x))
                lines.append(f"{y},{pixels},{usage}")
        (root / name).write_text("\n".join(lines) + "\n")
    return {"root": root, "bad": root / "bad.csv", "good": root / "good.csv"}


@pytest.fixture(scope="session")
def demo_experiment(demo_csvs, tmp_path_factory):
    """6 trials one at a time under ASHA (grace 1, max 3: a rung at epoch 1) on half the demo Training split,
    read from `bad.csv` (garbage PrivateTest). Shared by the search's tests, and copied for the final stage's."""
    results = tmp_path_factory.mktemp("results")
    r = run_command("search.run", "--space", "convnet", "--data", str(demo_csvs["bad"]), "--num-samples", str(N_DEMO),
                    "--max-epochs", "3", "--grace-epochs", "1", "--max-concurrent", "1", "--train-fraction", "0.5",
                    "--results", str(results), "--name", "demo", "--no-final", "--no-report", "--seed", str(DEMO_SEED))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return results / "demo", r


@pytest.fixture(scope="session")
def demo_final(demo_experiment, demo_csvs, tmp_path_factory):
    """The shared search copied elsewhere (as from a cluster), then its final stage on `good.csv`:
    1 configuration x 2 seeds x 1 epoch, every TTA mode, ending with the report. Shared by the final
    stage's tests and the report's, which only read it."""
    exp = tmp_path_factory.mktemp("final") / "demo"
    shutil.copytree(demo_experiment[0], exp)
    r = run_command("search.final", str(exp), "--data", str(demo_csvs["good"]), "--final-top-k", "1",
                    "--final-seeds", "2", "--final-epochs", "1", "--final-tta", "none", "flip", "tencrop")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return exp, r


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches gain nothing from intra-op threads, and on a shared CPU the thread pool's
    spin-waiting costs several times the work itself; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

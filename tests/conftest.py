"""Shared fixtures: the real FER2013 CSV (written once from the shared copy), a finished demo search, one CPU thread."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import N_DEMO, SHARED_FER, run_command


@pytest.fixture(scope="session")
def real_fer_csv(tmp_path_factory):
    """The exact Kaggle fer2013.csv, written by the shared `to_csv.py`; skipped where the copy is absent."""
    if not (SHARED_FER / "fer2013.npz").exists():
        pytest.skip(f"real FER2013 not found at {SHARED_FER} (see its README)")
    out = tmp_path_factory.mktemp("fer2013") / "fer2013.csv"
    subprocess.run([sys.executable, str(SHARED_FER / "to_csv.py"), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def demo_experiment(tmp_path_factory):
    """6 trials one at a time under ASHA (grace 1, max 3: a rung at epoch 1) on half the demo Training split.

    Shared by the search's tests and the report's (which copy it before adding a final stage)."""
    results = tmp_path_factory.mktemp("results")
    r = run_command("search.run", "--space", "convnet", "--data", "demo", "--num-samples", str(N_DEMO),
                    "--max-epochs", "3", "--grace-epochs", "1", "--max-concurrent", "1", "--train-fraction", "0.5",
                    "--results", str(results), "--name", "demo", "--no-final", "--no-report", "--seed", "43")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return results / "demo", r


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches gain nothing from intra-op threads, and on a shared CPU the thread pool's
    spin-waiting costs several times the work itself; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

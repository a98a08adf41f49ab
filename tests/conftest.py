"""Shared fixtures: the real FER2013 CSV (written once from the shared copy), one CPU thread."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import SHARED_FER


@pytest.fixture(scope="session")
def real_fer_csv(tmp_path_factory):
    """The exact Kaggle fer2013.csv, written by the shared `to_csv.py`; skipped where the copy is absent."""
    if not (SHARED_FER / "fer2013.npz").exists():
        pytest.skip(f"real FER2013 not found at {SHARED_FER} (see its README)")
    out = tmp_path_factory.mktemp("fer2013") / "fer2013.csv"
    subprocess.run([sys.executable, str(SHARED_FER / "to_csv.py"), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches gain nothing from intra-op threads, and on a shared CPU the thread pool's
    spin-waiting costs several times the work itself; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

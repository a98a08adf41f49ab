"""`python -m search.lr_find`: the LR range test as a curve, a CSV and a suggestion, end to end on demo data."""
from __future__ import annotations

import pandas as pd
import pytest

from tests.helpers import run_command


@pytest.mark.slow
def test_lr_find_writes_curve_and_suggestion(tmp_path):
    r = run_command("search.lr_find", "--arch", "convnet", "--data", "demo", "--steps", "60", "--batch-size", "32",
                "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    curve = pd.read_csv(tmp_path / "convnet-sgd-bs32.csv")
    assert list(curve.columns) == ["lr", "loss"] and 20 <= len(curve) <= 60
    assert curve["lr"].is_monotonic_increasing
    assert (tmp_path / "convnet-sgd-bs32.png").stat().st_size > 1000
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("suggested learning rate:"))
    assert curve["lr"].min() <= float(line.split(":")[1]) <= curve["lr"].max()
    assert "rule: steepest descent" in r.stdout


def test_lr_find_rejects_unknown_model(tmp_path):
    r = run_command("search.lr_find", "--arch", "vgg", "--data", "demo", "--out", str(tmp_path))
    assert r.returncode == 2 and "unknown model 'vgg'" in r.stderr and "Traceback" not in r.stderr

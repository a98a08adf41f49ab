"""`python -m search.augment_preview`: a PNG grid of an augmentation policy, and an unknown policy refused."""
from __future__ import annotations

import pytest

from tests.helpers import run_command
from trainables.augment import POLICIES


@pytest.mark.parametrize("policy", ["strong", "cutmix"])
def test_augment_preview_writes_png(tmp_path, policy):
    out = tmp_path / f"{policy}.png"
    r = run_command("search.augment_preview", "--policy", policy, "--data", "demo", "--images", "3", "--draws", "4",
                "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.stat().st_size > 1000


def test_augment_preview_unknown_policy(tmp_path):
    r = run_command("search.augment_preview", "--policy", "sepia", "--data", "demo", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "sepia" in r.stderr and sorted(POLICIES)[0] in r.stderr

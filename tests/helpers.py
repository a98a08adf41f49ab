"""Small shared helpers for the tests: FER-format files and running the real CLIs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED_FER = ROOT.parent / "shared" / "data" / "fer2013"
N_DEMO = 6  # trials of the shared demo experiment (conftest.demo_experiment)
DEMO_SEED = 43  # its --seed: the final runs' seeds are 44, 45
DEMO_SIZES = {"Training": 1400, "PublicTest": 350, "PrivateTest": 350}  # the demo data's splits
N_DUPLICATES = 10  # PrivateTest images of conftest.demo_csvs' good.csv copied from Training
N_DUP_PUBLIC = 3   # and from PublicTest (the split that chose the models)
TEMPERATURE = 2.0  # the temperature predictor_weights carries


def write_fer_csv(path: Path, n_per_split=(70, 21, 21), seed: int = 0, lines: list[str] | None = None) -> Path:
    """A small Kaggle-format fer2013.csv with every class in every split (or the given raw lines)."""
    rng = np.random.default_rng(seed)
    out = ["emotion,pixels,Usage"]
    for usage, n in zip(("Training", "PublicTest", "PrivateTest"), n_per_split):
        for i in range(n):
            pixels = " ".join(map(str, rng.integers(0, 256, 2304)))
            out.append(f"{i % 7},{pixels},{usage}")
    path.write_text("\n".join(out + (lines or [])) + "\n")
    return path


def run_command(module: str, *args: str, env: dict | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args...` as a user would, capturing its output."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)


def as_command(main):
    """A command's `main` as `python -m` runs it, in this process: its exit status (a UserError prints one
    line and is 2, Ctrl-C 130), argparse's SystemExit code included."""
    from search.tuning.cli import run_cli

    def run(argv: list[str]) -> int:
        try:
            return run_cli(main, argv)
        except SystemExit as exit_:
            return int(exit_.code)
    return run


def read_table(path, **kwargs):
    """A CSV the project wrote, with trial ids kept as text (an id like 01234567 is not a number)."""
    import pandas as pd

    return pd.read_csv(path, dtype={"trial_id": str}, **kwargs)


def predictor_weights(folder: Path) -> Path:
    """A small ConvNet's weights file carrying a temperature (TEMPERATURE), as the final stage writes it."""
    import torch

    from trainables.data.splits import EMOTIONS
    from trainables.models import build_model
    from trainables.weights import save_weights

    torch.manual_seed(0)
    model = build_model("convnet", num_classes=7, width=16, depth=2, dropout=0.0)
    return save_weights(folder / "run.pt", model.state_dict(), config={"width": 16, "depth": 2, "dropout": 0.0},
                        classes=EMOTIONS, info={"temperature": TEMPERATURE, "name": "run"})


def well_formed(df) -> None:
    """predictions.csv's rows: probabilities that sum to one, the emotion their argmax, `probability` their max."""
    from trainables.data.splits import EMOTIONS

    probs = df[[f"p_{c}" for c in EMOTIONS]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs >= 0).all()
    assert (df["emotion"] == [EMOTIONS[i] for i in probs.argmax(1)]).all()
    assert np.allclose(df["probability"], probs.max(1))

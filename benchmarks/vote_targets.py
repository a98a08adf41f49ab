"""Do FER+ votes help a model trained on FER2013's labels? The known-good recipe with and without them, same budget.

`python benchmarks/vote_targets.py --data fer2013.csv` (Microsoft's fer2013new.csv beside it) retrains
one configuration (the convnet space's one-cycle AdamW known-good recipe, as the final stage would)
from scratch on the full Training split for --epochs epochs, once per --shares value of
`ferplus_votes` (the share of each image's training target that is its folded FER+ vote
distribution, the rest its FER2013 label) and per --seeds seed. Every run has the same configuration,
epochs and seed set otherwise, so they differ only in their targets, and cost the same. Each keeps
its best PublicTest epoch, as a final run does; each is then scored once on PrivateTest against the
FER2013 labels (the benchmark chooses nothing by it: every share is reported), without TTA and with
flip, and audited against FER+ (`search.final_stage.labels`). Runs go --parallel at a time, one
thread each. Writes under --out (results/benchmarks/):

- `vote_targets/votes<share in %>-seed<k>.pt`: each run's weights (`python -m search.evaluate --model ...`);
- `vote_targets_runs.csv`: one row per run: PublicTest and PrivateTest accuracy (none, flip), the
  PrivateTest accuracy on the FER+ majority and on the agreed subset, the share of mistakes FER+
  sides the model with, the best epoch and the seconds it trained;
- `vote_targets.csv`: per share, the mean and sample standard deviation over seeds, and the
  difference of the mean from share 0.

A run whose weights are already in `vote_targets/` is scored, not retrained, so shares can be added in a
later sitting (`--shares 0.2`) and the tables hold every run there is. Defaults (3 shares x 2 seeds x 15
epochs, 2 at a time) took 31 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.final_stage.labels import ALL, audit_table  # noqa: E402
from search.final_stage.retrain import retrain, without_test  # noqa: E402
from search.tuning.warm_start import KNOWN_GOOD  # noqa: E402
from trainables.config import TrialConfig  # noqa: E402
from trainables.data import SPLITS, load_fer2013  # noqa: E402
from trainables.inference import predict  # noqa: E402
from trainables.weights import load_weights, save_weights  # noqa: E402

RECIPE = {**KNOWN_GOOD["convnet"][1], "arch": "convnet"}  # one-cycle AdamW, width 32, depth 3


def weights_path(out: str | Path, share: float, seed: int) -> Path:
    """`votes<share in %>-seed<k>.pt` (no dot in the stem: save_weights sets the suffix)."""
    return Path(out) / f"votes{round(100 * share)}-seed{seed}.pt"


def kept_run(out: str | Path, share: float, seed: int, epochs: int) -> dict | None:
    """The row of a run trained in an earlier sitting with the same epochs, or None."""
    path = weights_path(out, share, seed)
    if not path.with_suffix(".json").is_file():
        return None
    meta = json.loads(path.with_suffix(".json").read_text())
    if meta.get("epochs") != epochs:
        return None
    return {"ferplus_votes": share, "seed": seed, "epochs": epochs, "best_epoch": meta["best_epoch"],
            "val_acc": meta["val_acc"], "train_s": meta["train_s"], "weights": str(path)}


def train_one(data_path: str, share: float, seed: int, epochs: int, out: str) -> dict:
    """Train one run in this process (one thread) and save its weights; returns its row without test figures."""
    kept = kept_run(out, share, seed, epochs)
    if kept:
        return kept
    torch.set_num_threads(1)
    data = load_fer2013(data_path, splits=SPLITS[:2], votes=True)
    config = TrialConfig.from_dict({**RECIPE, "ferplus_votes": share})
    started = time.perf_counter()
    got = retrain(config, without_test(data), epochs=epochs, seed=seed, threads=1, ttas=("none",),
                  label=f"votes {share:g} seed {seed}")
    seconds = time.perf_counter() - started
    weights = save_weights(weights_path(out, share, seed), got["state_dict"], config=config, classes=data.classes,
                           info={"seed": seed, "best_epoch": got["best_epoch"], "val_acc": got["val_acc"],
                                 "epochs": epochs, "train_s": round(seconds)})
    return {"ferplus_votes": share, "seed": seed, "epochs": epochs, "best_epoch": got["best_epoch"],
            "val_acc": got["val_acc"], "train_s": round(seconds), "weights": str(weights)}


def score(row: dict, data) -> dict:
    """The run's PrivateTest figures against the FER2013 labels, and its audit against FER+."""
    model, _ = load_weights(row["weights"], device=torch.device("cpu"))
    test = data.test
    y = test.y.numpy()
    probs = {tta: predict(model, test.x, device=torch.device("cpu"), tta=tta).numpy() for tta in ("none", "flip")}
    audit = audit_table(probs["none"], y, test.votes.numpy(), data.classes)
    every = audit[audit["emotion"] == ALL].iloc[0]
    return {**row, "accuracy": float((probs["none"].argmax(1) == y).mean()),
            "accuracy_flip": float((probs["flip"].argmax(1) == y).mean()),
            "accuracy_ferplus": every["accuracy_ferplus"], "accuracy_agreed": every["accuracy_agreed"],
            "ferplus_sides_model": every["ferplus_sides_model"], "accuracy_either": every["accuracy_either"]}


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    cols = ["val_acc", "accuracy", "accuracy_flip", "accuracy_ferplus", "accuracy_agreed", "ferplus_sides_model"]
    g = runs.groupby("ferplus_votes")[cols]
    table = g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_std")).join(g.size().rename("seeds"))
    base = table.loc[0.0] if 0.0 in table.index else None
    if base is not None:
        for c in cols:
            table[f"{c}_vs_0"] = table[f"{c}_mean"] - base[f"{c}_mean"]
    return table.reset_index()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="fer2013.csv, with fer2013new.csv beside it")
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 1.0, 0.5],
                   help="ferplus_votes values to compare (default 0 1 0.5; runs kept from earlier sittings are "
                        "added to the tables)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds per share (default 1 2)")
    p.add_argument("--epochs", type=int, default=15, help="epochs per run (default 15)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each (default 2)")
    p.add_argument("--out", default="results/benchmarks", help="output folder (default results/benchmarks)")
    a = p.parse_args(argv)
    out = Path(a.out)
    folder = out / "vote_targets"
    folder.mkdir(parents=True, exist_ok=True)
    data = load_fer2013(a.data, splits=SPLITS, votes=True)
    if data.test.votes is None:
        p.error(f"no FER+ votes beside {a.data}: put Microsoft's fer2013new.csv there")
    kept = sorted({int(p.stem.removeprefix("votes").split("-seed")[0]) / 100 for p in folder.glob("votes*-seed*.pt")})
    shares = list(dict.fromkeys([*a.shares, *kept]))
    jobs = [(seed, share) for seed in a.seeds for share in shares]
    with ProcessPoolExecutor(a.parallel) as pool:
        futures = [pool.submit(train_one, a.data, share, seed, a.epochs, str(folder)) for seed, share in jobs]
        rows = []
        for f in futures:
            rows.append(score(f.result(), data))
            runs = pd.DataFrame(rows).sort_values(["ferplus_votes", "seed"])
            runs.to_csv(out / "vote_targets_runs.csv", index=False)  # each run as it ends: a stop keeps them
            print(runs.drop(columns=["weights"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"),
                  flush=True)
    table = summarize(runs)
    table.to_csv(out / "vote_targets.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\n{out / 'vote_targets_runs.csv'}\n{out / 'vote_targets.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

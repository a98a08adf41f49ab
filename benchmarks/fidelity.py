"""Does a trial's rank at a rung predict its rank after full training? Spearman's rho, live weights against EMA.

`python benchmarks/fidelity.py --data PATH` takes --configs configurations (the convnet
space's known-good ones, then random draws from the space, seeded; range-tested ones left
out, since their rate is a second random draw), and trains each twice, with exactly the code
a trial and the final stage run (`trainables.runner`, `search.final_stage.retrain.retrain`):

- at the search's fidelity: --search-epochs epochs on --train-fraction of Training, judged
  on PublicTest after every epoch (a rung at every epoch);
- at the final stage's: --final-epochs on all of Training, keeping its best PublicTest epoch.

Every run keeps an exponential moving average of its weights (`ema_fraction`, --ema-fraction
of the run) beside the live weights and reports both, so one set of runs gives both answers:

- *live*: a trial judged as before EMA, by the best PublicTest accuracy of its live weights
  so far, against the final run's best live-weights accuracy;
- *ema*: judged by its averaged weights, against the final run's best averaged-weights accuracy
  (what a final stage with EMA keeps).

For each rung it prints and writes Spearman's rank correlation of the two (scipy), with its
p-value; the final accuracy of live and averaged weights per configuration shows whether EMA
also changes what the final stage delivers. PublicTest only: PrivateTest is never loaded.

Writes under --out (results/benchmarks/): `fidelity_runs.csv` (one row per configuration and
rung), `fidelity.csv` (rho per rung, live and ema) and `fidelity.png`. --workers runs at once
(one thread each). Defaults: 8 configurations, 5 search epochs on 30%, 10 final epochs, about
45 minutes on 2 CPU cores (a width-64 configuration alone takes 20).
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search.final_stage.retrain import retrain  # noqa: E402
from search.run import load_search_data  # noqa: E402
from search.tuning.console import Tally  # noqa: E402
from search.tuning.settings import Settings  # noqa: E402
from search.tuning.warm_start import KNOWN_GOOD  # noqa: E402
from spaces import get_space  # noqa: E402
from trainables.config import TrialConfig  # noqa: E402
from trainables.data import FERData  # noqa: E402
from trainables.runner import build_run, run_epoch  # noqa: E402


def configs(n: int, seed: int, ema_fraction: float) -> list[dict]:
    """The convnet space's known-good configurations, then seeded random draws from the space."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = get_space("convnet")
    out = [{**c, "arch": "convnet"} for c in KNOWN_GOOD["convnet"]][:n]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    while len(out) < n:
        trial = study.ask()
        returned = space(trial)  # first: it draws the parameters
        config = {**trial.params, **returned}
        study.tell(trial, 0.0)
        if config["lr_mode"] == "searched":
            out.append(config)
    return [TrialConfig.from_dict({**c, "ema_fraction": ema_fraction}).to_dict() for c in out]


def _data(path: str, fraction: float, seed: int) -> FERData:
    """Training (a stratified `fraction`) and PublicTest, as the search loads them: never PrivateTest."""
    return load_search_data(Settings(space="convnet", name="fidelity", data=path, train_fraction=fraction,
                                     seed=seed))


def measure(index: int, config: dict, a: argparse.Namespace) -> tuple[list[dict], str]:
    """One configuration at both fidelities: a row per search epoch (rung) with the final run's figures,
    and a line that sums it up."""
    import torch

    torch.set_num_threads(1)
    started = time.time()
    run = build_run(config, _data(a.data, a.train_fraction, a.seed), epochs=a.search_epochs, seed=a.seed)
    rungs = []
    for _ in range(a.search_epochs):
        m = run_epoch(run)
        rungs.append({"rung": m["epoch"], "live": m["raw_val_acc"], "ema": m["val_acc"]})
    search_seconds = time.time() - started
    final = retrain(TrialConfig.from_dict(config), _data(a.data, 1.0, a.seed), epochs=a.final_epochs,
                    seed=a.seed + 1, ttas=["none"])
    final_live = max(h["raw_val_acc"] for h in final["history"])
    final_ema = max(h["val_acc"] for h in final["history"])
    line = (f"config {index}: {config['optimizer']} {config['schedule']} width {config['width']} batch "
            f"{config['batch_size']}: search live {max(r['live'] for r in rungs):.4f} ema "
            f"{max(r['ema'] for r in rungs):.4f}; final live {final_live:.4f} ema {final_ema:.4f} "
            f"({time.time() - started:.0f} s)")
    best_live = best_ema = 0.0
    rows = []
    for r in rungs:
        best_live, best_ema = max(best_live, r["live"]), max(best_ema, r["ema"])
        rows.append({"config": index, **{k: config[k] for k in ("optimizer", "schedule", "width", "batch_size",
                                                                "augment", "lr", "warmup_fraction")},
                     "rung": r["rung"], "search_live": best_live, "search_ema": best_ema,
                     "final_live": final_live, "final_ema": final_ema, "search_seconds": search_seconds,
                     "final_seconds": time.time() - started - search_seconds})
    return rows, line


def correlations(runs: pd.DataFrame) -> pd.DataFrame:
    """Spearman's rho (and p) per rung: the objective so far against the final best, live and ema."""
    from scipy.stats import spearmanr

    rows = []
    for rung, g in runs.groupby("rung"):
        row = {"rung": int(rung), "configs": len(g)}
        for kind in ("live", "ema"):
            rho, p = spearmanr(g[f"search_{kind}"], g[f"final_{kind}"])
            row.update({f"rho_{kind}": float(rho), f"p_{kind}": float(p)})
        rows.append(row)
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for kind, label in (("live", "live weights (before)"), ("ema", "EMA of the weights (after)")):
        ax.plot(table["rung"], table[f"rho_{kind}"], marker="o", label=label)
    ax.set(xlabel="rung (search epoch)", ylabel="Spearman rho vs final PublicTest", ylim=(-1, 1))
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/fer2013.csv", help="FER2013 as Kaggle's fer2013.csv")
    p.add_argument("--configs", type=int, default=8)
    p.add_argument("--search-epochs", type=int, default=5)
    p.add_argument("--train-fraction", type=float, default=0.3)
    p.add_argument("--final-epochs", type=int, default=10)
    p.add_argument("--ema-fraction", type=float, default=0.1, help="the EMA's window, as a share of each run")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/benchmarks")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = configs(a.configs, a.seed, a.ema_fraction)
    started = time.time()
    tally = Tally(len(chosen), "configurations")
    parts = []
    with ProcessPoolExecutor(a.workers) as pool:
        for rows, line in pool.map(measure, range(len(chosen)), chosen, [a] * len(chosen)):
            parts.append(rows)
            tally.done(line)
    tally.close()
    runs = pd.DataFrame([row for part in parts for row in part])
    runs.to_csv(out / "fidelity_runs.csv", index=False)
    table = correlations(runs)
    table.to_csv(out / "fidelity.csv", index=False)
    plot(table, out / "fidelity.png")
    last = runs[runs["rung"] == runs["rung"].max()]
    print(f"\n{len(chosen)} configurations, {a.search_epochs} search epochs on {a.train_fraction:.0%} of Training, "
          f"{a.final_epochs} final epochs on all of it, EMA over {a.ema_fraction:.0%} of each run "
          f"({time.time() - started:.0f} s):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"final PublicTest, mean over configurations: live weights {last['final_live'].mean():.4f}, "
          f"EMA {last['final_ema'].mean():.4f} (EMA better for {int((last['final_ema'] > last['final_live']).sum())}"
          f" of {len(last)})")
    print(f"written: {out / 'fidelity.csv'}, {out / 'fidelity_runs.csv'}, {out / 'fidelity.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m search.final results/<name>`: retrain the best configurations, evaluate them once on PrivateTest.

Reads top to bottom: pick the top-k configurations of the search by PublicTest
accuracy; load the data with all three splits (this stage and `search.evaluate`
are the only readers of PrivateTest); retrain each configuration from scratch on
the full Training split with several seeds, in parallel as Ray tasks that see only
Training and PublicTest and keep their best PublicTest epoch; save the weights;
then score every run, the per-configuration mean and spread and two ensembles on
PrivateTest, once per test-time augmentation, and write tables and pictures under
`results/<name>/final/`. `search.run` calls `run_final` after the search.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from search.cli import run_cli
from search.evaluate import load_weights, save_weights, score_split
from search.export import load_trials
from search.settings import Settings, _Parser, add_final_flags, check_settings
from trainables.data import SEARCH_SPLITS, SPLITS, FERData, duplicate_mask, load_fer2013
from trainables.errors import UserError
from trainables.files import write_csv, write_text
from trainables.metrics import SCALAR_METRICS, confused_pairs, ensemble_probs, misclassified, normalize_rows
from trainables.report import emotion_activations, plot_activations, plot_confusion, plot_kernels, plot_mistakes
from trainables.train import DEFAULTS, METRIC, TTA_MODES, DivergedError, build_run, pick_device, predict, run_epoch

FINAL_DIR = "final"
# Statuses whose val_acc does not describe a working configuration.
SKIPPED_STATUSES = ("ERROR", "DIVERGED")
# The error analysis (confused pairs, mistakes) is done without test-time augmentation.
ANALYSIS_TTA = "none"
MISTAKES_SHOWN = 36
KINDS = ("run", "mean", "std", "ensemble_all", "ensemble_best")
METRIC_COLUMNS = ["kind", "config", "trial_id", "seed", "tta", "n_runs", "best_epoch", "val_acc", "search_val_acc",
                  *SCALAR_METRICS, "accuracy_dedup", "n_duplicates", "n_images", "beta"]


@dataclass(frozen=True)
class Candidate:
    """One configuration chosen for retraining: its rank in the search, trial id, config and PublicTest accuracy."""

    rank: int
    trial_id: str
    config: dict
    search_val_acc: float

    @property
    def name(self) -> str:
        return f"top{self.rank}-{self.trial_id}"


@dataclass
class FinalRun:
    """One retrained (configuration, seed): its weights file, best PublicTest epoch and PublicTest probabilities."""

    candidate: Candidate
    seed: int
    weights: Path
    best_epoch: int
    val_acc: float
    val_probs: dict[str, np.ndarray]  # per TTA mode, of the kept weights

    @property
    def name(self) -> str:
        return f"{self.candidate.name}-seed{self.seed}"


# --------------------------------------------------------------------------- choosing the configurations

def _is_missing(value: Any) -> bool:
    return value is None or (pd.api.types.is_scalar(value) and pd.isna(value))


def _restore_type(key: str, value: Any) -> Any:
    """Undo what a table did to a config value: numpy scalars, ints stored as floats beside NaN, bools as text."""
    if isinstance(value, np.generic):
        value = value.item()
    default = DEFAULTS.get(key)
    if isinstance(default, bool):
        return value.strip().lower() in ("true", "1") if isinstance(value, str) else bool(value)
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    return value


def config_from_row(row: pd.Series) -> dict:
    """The hyperparameters of one trials.csv row: its `config/<key>` cells, NaN (not set by the space) dropped."""
    return {col[len("config/"):]: _restore_type(col[len("config/"):], value)
            for col, value in row.items() if str(col).startswith("config/") and not _is_missing(value)}


def select_candidates(trials: pd.DataFrame, top_k: int) -> list[Candidate]:
    """The `top_k` trials with the best PublicTest accuracy, skipping errored and diverged ones."""
    if trials.empty or METRIC not in trials.columns:
        return []
    ok = trials[trials[METRIC].notna() & ~trials["status"].isin(SKIPPED_STATUSES)]
    ok = ok.sort_values(METRIC, ascending=False, kind="stable").head(top_k)
    return [Candidate(rank=i, trial_id=str(row["trial_id"]), config=config_from_row(row),
                      search_val_acc=float(row[METRIC])) for i, (_, row) in enumerate(ok.iterrows(), start=1)]


# --------------------------------------------------------------------------- data (the protocol)

def load_final_data(s: Settings) -> FERData:
    """All three splits, with the FULL Training split (the search's --train-fraction does not apply here)."""
    return load_fer2013(s.data, splits=SPLITS, labels=s.labels, ferplus_path=s.ferplus or None, seed=s.seed)


def without_test(data: FERData) -> FERData:
    """What a retraining task may see: Training and PublicTest, never PrivateTest."""
    return FERData(classes=data.classes, splits={k: data.splits[k] for k in SEARCH_SPLITS}, source=data.source)


# --------------------------------------------------------------------------- retraining (runs in a Ray task)

def write_scalars(tensorboard_dir: str | Path, history: Sequence[dict]) -> None:
    """Write per-epoch scalars of a run as TensorBoard events (used where the task could not write them here)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tensorboard_dir)) as writer:
        for metrics in history:
            _add_scalars(writer, metrics)


def _add_scalars(writer, metrics: dict) -> None:
    """One epoch's metrics as TensorBoard scalars, at that epoch."""
    for key, value in metrics.items():
        if key != "epoch":
            writer.add_scalar(key, value, int(metrics["epoch"]))


def _open_writer(tensorboard_dir: str | None):
    from torch.utils.tensorboard import SummaryWriter

    if not tensorboard_dir:
        return None
    try:
        return SummaryWriter(tensorboard_dir)
    except OSError:  # a cluster node that cannot write the driver's results path: the driver writes them
        return None


def retrain(config: dict, data: FERData, *, epochs: int, seed: int, threads: int = 1,
            tensorboard_dir: str | None = None, label: str = "", ttas: Sequence[str] = TTA_MODES) -> dict:
    """Train `config` from scratch for `epochs`, keeping the weights of its best PublicTest epoch.

    Plain PyTorch (the final stage runs it as a Ray task). Returns the best epoch's
    state_dict on the CPU, that epoch's number and PublicTest accuracy, the per-epoch
    history, `diverged` (the error, or "") if the loss stopped being finite, and
    `val_probs`: the kept weights' PublicTest probabilities per TTA mode (computed
    here, in parallel, because PublicTest is the task's to read; PrivateTest is not).
    A run that diverges in its first epoch returns `state_dict` None.
    """
    torch.set_num_threads(max(1, threads))
    run = build_run(config, data, epochs=epochs, seed=seed)
    writer = _open_writer(tensorboard_dir)
    best: dict = {"state_dict": None, "best_epoch": 0, "val_acc": float("nan")}
    history, diverged = [], ""
    try:
        while run.epoch < epochs:
            try:
                metrics = run_epoch(run)
            except DivergedError as err:
                diverged = str(err)
                break
            history.append(metrics)
            if writer:
                _add_scalars(writer, metrics)
                writer.flush()
            # Strictly better only: on a tie the earlier (less trained) epoch is kept.
            if best["state_dict"] is None or metrics["val_acc"] > best["val_acc"]:
                state = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
                best = {"state_dict": state, "best_epoch": run.epoch, "val_acc": float(metrics["val_acc"])}
            print(f"{label} epoch {run.epoch}/{epochs}: PublicTest accuracy {metrics['val_acc']:.4f}", flush=True)
    finally:
        if writer:
            writer.close()
    val_probs = {}
    if best["state_dict"] is not None:
        run.model.load_state_dict(best["state_dict"])
        val_probs = {tta: predict(run.model, run.val.x, device=run.device, tta=tta).numpy() for tta in ttas}
    return {**best, "history": history, "diverged": diverged, "val_probs": val_probs}


def _get(ref):
    """ray.get, turning a UserError raised inside a task back into itself (one line, not Ray's traceback)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(getattr(err, "cause", None), UserError):
            raise UserError(str(err.cause)) from None
        raise


def retrain_all(s: Settings, data: FERData, candidates: Sequence[Candidate], *, epochs: int,
                out: Path, ttas: Sequence[str] = TTA_MODES) -> list[FinalRun]:
    """Retrain every candidate with every seed as parallel Ray tasks (trial resources each); save the weights."""
    import ray

    from search.run import start_ray, trial_resources

    started = not ray.is_initialized()  # search.run has already started (or joined) Ray
    cluster = start_ray(s) if started else ray.cluster_resources()
    pending: list = []
    try:
        resources, _ = trial_resources(s, cluster)
        task = ray.remote(retrain).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"])
        data_ref = ray.put(without_test(data))
        jobs = {}
        for cand in candidates:
            for seed in seeds_of(s):
                name = f"{cand.name}-seed{seed}"
                board = (out / "tensorboard" / name).resolve()
                ref = task.remote(cand.config, data_ref, epochs=epochs, seed=seed, threads=s.cpus_per_trial,
                                  tensorboard_dir=str(board), label=name, ttas=list(ttas))
                jobs[ref] = (cand, seed, board)
        print(f"final stage: retraining {len(candidates)} configurations x {s.final_seeds} seeds "
              f"for {epochs} epochs on {len(data.train)} Training images "
              f"({resources['cpu']} CPU, {resources['gpu']} GPU each)", flush=True)
        runs, pending = [], list(jobs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            cand, seed, board = jobs[done[0]]
            result = _get(done[0])
            run = save_run(result, cand, seed, s, data, out, board)
            if run:
                runs.append(run)
                print(f"final run {run.name}: best PublicTest accuracy {run.val_acc:.4f} at epoch "
                      f"{run.best_epoch} ({len(jobs) - len(pending)}/{len(jobs)} done)", flush=True)
    except BaseException:
        for ref in pending:  # a failed run or Ctrl-C: do not leave the others training on a shared cluster
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
    return sorted(runs, key=lambda r: (r.candidate.rank, r.seed))


def seeds_of(s: Settings) -> list[int]:
    """The seeds of the final runs: consecutive from the experiment's --seed."""
    return [s.seed + i for i in range(s.final_seeds)]


def save_run(result: dict, cand: Candidate, seed: int, s: Settings, data: FERData, out: Path,
             board: Path) -> FinalRun | None:
    """Write a finished task's best weights (+ config JSON) and make sure its TensorBoard scalars exist here."""
    name = f"{cand.name}-seed{seed}"
    if result["history"] and not any(board.glob("events.out.tfevents.*")):
        write_scalars(board, result["history"])  # the task ran on another node, whose disk we cannot see
    if result["state_dict"] is None:
        print(f"final run {name}: diverged in its first epoch ({result['diverged']}); left out", flush=True)
        return None
    info = {"name": name, "trial_id": cand.trial_id, "seed": seed, "best_epoch": result["best_epoch"],
            "val_acc": result["val_acc"], "search_val_acc": cand.search_val_acc, "labels": s.labels,
            "experiment": s.name, "data_seed": s.seed, "diverged": result["diverged"], "history": result["history"]}
    path = save_weights(out / "models" / name, result["state_dict"], config=cand.config, classes=data.classes,
                        info=info)
    return FinalRun(candidate=cand, seed=seed, weights=path, best_epoch=int(result["best_epoch"]),
                    val_acc=float(result["val_acc"]), val_probs=result["val_probs"])


# --------------------------------------------------------------------------- evaluation (the driver, once)

def predict_runs(runs: Sequence[FinalRun], data: FERData, *, ttas: Sequence[str],
                 device: torch.device) -> dict[tuple[str, str], np.ndarray]:
    """PrivateTest probabilities of every saved run, reloaded from its weights file, per TTA mode."""
    probs = {}
    for run in runs:
        model, _ = load_weights(run.weights, device=device)
        for tta in ttas:
            probs[run.name, tta] = predict(model, data.test.x, device=device, tta=tta).numpy()
    return probs


def ensemble_members(runs: Sequence[FinalRun]) -> dict[str, list[FinalRun]]:
    """The two ensembles: every run, and the best run of each configuration by its PublicTest accuracy."""
    best: dict[str, FinalRun] = {}
    for run in runs:
        key = run.candidate.name
        if key not in best or run.val_acc > best[key].val_acc:
            best[key] = run
    return {"ensemble_all": list(runs), "ensemble_best": list(best.values())}


def score_models(runs: Sequence[FinalRun], probs: dict, data: FERData, *, ttas: Sequence[str],
                 beta: float) -> tuple[list[dict], dict[tuple[str, str], dict]]:
    """Score every run and ensemble on PrivateTest per TTA mode: metric rows, and each model's full metrics."""
    dup = duplicate_mask(data.test, data.train).numpy()
    val_y = data.val.y.numpy()
    models = [(run.name, {"kind": "run", "config": run.candidate.name, "trial_id": run.candidate.trial_id,
                          "seed": run.seed, "n_runs": 1, "best_epoch": run.best_epoch,
                          "search_val_acc": run.candidate.search_val_acc}, [run]) for run in runs]
    for kind, members in ensemble_members(runs).items():
        models.append((kind, {"kind": kind, "config": "+".join(r.name for r in members), "n_runs": len(members)},
                       members))
    rows, full = [], {}
    for tta in ttas:
        for name, ids, members in models:
            val = ensemble_probs([m.val_probs[tta] for m in members])
            test = ensemble_probs([probs[m.name, tta] for m in members])
            m = score_split(test, data.test, beta=beta, class_names=data.classes, duplicates=dup)
            m.update(val_acc=float((val.argmax(1) == val_y).mean()), probs=test)
            full[name, tta] = m
            rows.append({**ids, "tta": tta, "val_acc": m["val_acc"], **{k: m[k] for k in SCALAR_METRICS},
                         "accuracy_dedup": m["accuracy_dedup"], "n_duplicates": m["n_duplicates"],
                         "n_images": m["n_images"], "beta": beta})
    return rows, full


def summarize_seeds(rows: list[dict]) -> list[dict]:
    """A mean and a (sample) std row per configuration and TTA mode over its seeds; std is blank for one seed."""
    runs = pd.DataFrame([r for r in rows if r["kind"] == "run"])
    numeric = ["best_epoch", "val_acc", "search_val_acc", *SCALAR_METRICS, "accuracy_dedup"]
    out = []
    for (config, trial_id, tta), group in runs.groupby(["config", "trial_id", "tta"], sort=False):
        for kind, values in (("mean", group[numeric].mean()), ("std", group[numeric].std(ddof=1))):
            out.append({"kind": kind, "config": config, "trial_id": trial_id, "tta": tta, "n_runs": len(group),
                        **values.to_dict(), "n_duplicates": group["n_duplicates"].iloc[0],
                        "n_images": group["n_images"].iloc[0], "beta": group["beta"].iloc[0]})
    return out


def metrics_table(rows: list[dict], ttas: Sequence[str]) -> pd.DataFrame:
    """metrics.csv: per configuration its runs, mean and std rows; the ensembles last; TTA modes side by side."""
    df = pd.DataFrame(rows + summarize_seeds(rows)).reindex(columns=METRIC_COLUMNS)
    rank = df["config"].str.extract(r"^top(\d+)-", expand=False).astype(float)
    df["_rank"] = np.where(df["kind"].str.startswith("ensemble"), np.inf, rank)
    df["_kind"] = df["kind"].map(KINDS.index)
    df["_tta"] = df["tta"].map(list(ttas).index)
    df = df.sort_values(["_rank", "_kind", "seed", "_tta"], kind="stable", na_position="first")
    df["seed"] = df["seed"].astype("Int64")  # blank, not NaN-as-float, on mean/std/ensemble rows
    return df.drop(columns=["_rank", "_kind", "_tta"]).reset_index(drop=True)


def per_class_table(full: dict[tuple[str, str], dict]) -> pd.DataFrame:
    """per_class.csv: precision, recall, F-beta and support per class, for every run and ensemble, per TTA."""
    parts = [m["per_class"].assign(model=name, tta=tta) for (name, tta), m in full.items()]
    df = pd.concat(parts, ignore_index=True)
    return df[["model", "tta", "class", "precision", "recall", "fbeta", "support"]]


def choose_analysed(full: dict[tuple[str, str], dict], runs: Sequence[FinalRun]) -> str:
    """The model the error analysis describes: best PublicTest accuracy without TTA (single runs win ties)."""
    names = [r.name for r in runs] + list(ensemble_members(runs))
    return max(names, key=lambda n: full[n, ANALYSIS_TTA]["val_acc"])


def confusion_table(model: str, full: dict, classes: Sequence[str], ttas: Sequence[str]) -> pd.DataFrame:
    """confusion_matrix.csv: counts then row shares, rows = true class, one block per TTA mode."""
    blocks = []
    for tta in ttas:
        cm = full[model, tta]["confusion"]
        for value, matrix in (("count", cm), ("share", normalize_rows(cm))):
            # object dtype: counts stay integers in the CSV although shares share their columns
            block = pd.DataFrame(matrix.astype(object), columns=list(classes))
            block.insert(0, "true", list(classes))
            block.insert(0, "value", value)
            block.insert(0, "tta", tta)
            block.insert(0, "model", model)
            blocks.append(block)
    return pd.concat(blocks, ignore_index=True)


def write_error_analysis(out: Path, model: str, full: dict, data: FERData, ttas: Sequence[str]) -> None:
    """Confusion matrix (CSV + PNG), confused pairs, misclassified images (CSV + PNG grid) of one model."""
    classes = data.classes
    write_csv(confusion_table(model, full, classes, ttas), out / "confusion_matrix.csv")
    plot_confusion({f"tta={t}": full[model, t]["confusion"] for t in ttas}, classes, out / "confusion_matrix.png",
                   title=f"PrivateTest confusion of {model}")
    m = full[model, ANALYSIS_TTA]
    pairs = confused_pairs(m["confusion"], classes)
    pairs.insert(0, "tta", ANALYSIS_TTA)
    pairs.insert(0, "model", model)
    write_csv(pairs, out / "confused_pairs.csv")
    wrong = misclassified(m["probs"], data.test.y.numpy(), data.test.rows.numpy(), classes)
    shown = wrong.head(MISTAKES_SHOWN)
    captions = [f"row {r.row}\n{r.true} -> {r.predicted} {r.confidence:.0%}" for r in shown.itertuples()]
    plot_mistakes(data.test.x.numpy()[shown.index.to_numpy()], captions, out / "misclassified.png",
                  title=f"most confident PrivateTest mistakes of {model} (tta={ANALYSIS_TTA})")
    wrong.insert(0, "tta", ANALYSIS_TTA)
    wrong.insert(0, "model", model)
    write_csv(wrong, out / "misclassified.csv")


def write_visualisations(out: Path, runs: Sequence[FinalRun], data: FERData) -> str:
    """kernels.png and activations.png of the best single run by PublicTest; returns its name.

    The activation maps are computed on PublicTest: a picture is not a choice, but there is
    no reason to read PrivateTest for it either.
    """
    best = max(runs, key=lambda r: r.val_acc)
    model, _ = load_weights(best.weights, device=pick_device())
    plot_kernels(model, out / "kernels.png", title=f"first-layer kernels of {best.name}")
    faces, maps = emotion_activations(model, data.val.x, data.val.y, data.num_classes)
    plot_activations(faces, maps, data.classes, out / "activations.png",
                     title=f"PublicTest mean face and activation relative to the average emotion, {best.name}")
    return best.name


def write_readme(out: Path, s: Settings, model: str, epochs: int, ttas: Sequence[str]) -> None:
    """final/README.md: what each file holds and which model the error analysis describes."""
    write_text(out / "README.md", f"""# Final stage of {s.name}

The top {s.final_top_k} configuration(s) of the search (by PublicTest accuracy) were retrained from
scratch on the full Training split for {epochs} epoch(s) with seeds {seeds_of(s)}; each run kept
its best PublicTest epoch. Everything below was measured once on PrivateTest, which the search
never read. TTA modes: {', '.join(ttas)} (reported separately, never mixed).

- `metrics.csv`: one row per run and TTA mode (`kind` run), a `mean` and a sample `std` row per
  configuration and TTA mode, and the ensembles (`ensemble_all`: softmax average of every run;
  `ensemble_best`: of the best run per configuration by PublicTest). `val_acc` is the same
  model's PublicTest accuracy, `search_val_acc` the trial's during the search;
  `accuracy_dedup` leaves out the `n_duplicates` PrivateTest images pixel-identical to a
  Training image; F-beta uses beta={s.beta:g}.
- `per_class.csv`: precision, recall, F-beta and support per class, per model and TTA mode.
- `confusion_matrix.csv` / `.png`, `confused_pairs.csv`, `misclassified.csv` / `.png`: error
  analysis of **{model}**, the model with the best PublicTest accuracy without TTA; the pairs
  and mistakes are without TTA. `row` is the 0-based data row of the source CSV (line row + 2).
- `kernels.png`, `activations.png`: the first-layer kernels of the best single run, and per
  emotion its mean PublicTest face with where its deepest convolution that keeps a spatial grid
  fires more (red) or less (blue) than on the average emotion.
- `models/<config>-seed<k>.pt`: state_dict, config and classes (`torch.load(..., weights_only=True)`,
  or `python -m search.evaluate --model ... --data ...`), with the config as JSON beside it.
- `tensorboard/<config>-seed<k>/`: per-epoch scalars of each run (`tensorboard --logdir {out}`).
""")


def print_table(df: pd.DataFrame) -> None:
    """Print the headline columns of metrics.csv."""
    cols = ["kind", "config", "seed", "tta", "val_acc", "accuracy", "accuracy_dedup", "fbeta_macro",
            "top2_accuracy"]
    view = df[cols].copy()
    view["config"] = view["config"].str.slice(0, 40)
    view["seed"] = view["seed"].map(lambda v: "" if _is_missing(v) else str(int(v)))
    print(view.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep=""))


# --------------------------------------------------------------------------- the stage

def clear_outputs(out: Path) -> None:
    """Remove the weights and TensorBoard runs of an earlier final stage, so no stale run is left behind."""
    for sub in ("models", "tensorboard"):
        shutil.rmtree(out / sub, ignore_errors=True)


def run_final(settings: Settings, trials_df: pd.DataFrame) -> Path:
    """Retrain the top configurations of `trials_df` and evaluate them on PrivateTest; returns the output folder.

    Each TTA mode in `settings.final_tta` gets its own rows.
    """
    s = settings
    out = s.experiment_dir / FINAL_DIR
    candidates = select_candidates(trials_df, s.final_top_k)
    if not candidates:
        raise UserError(f"no trial of {s.experiment_dir} has a PublicTest accuracy (errored and diverged trials "
                        f"do not count); finish at least one epoch of the search (--resume) first")
    epochs = s.final_epochs or s.max_epochs
    start = time.perf_counter()
    data = load_final_data(s)  # before any training: a bad PrivateTest fails now, not after hours
    clear_outputs(out)
    ttas = [ANALYSIS_TTA, *dict.fromkeys(t for t in s.final_tta if t != ANALYSIS_TTA)]  # the analysis needs "none"
    runs = retrain_all(s, data, candidates, epochs=epochs, out=out, ttas=ttas)
    if not runs:
        raise UserError("every final run diverged in its first epoch; nothing to evaluate")
    probs = predict_runs(runs, data, ttas=ttas, device=pick_device())
    rows, full = score_models(runs, probs, data, ttas=ttas, beta=s.beta)
    table = metrics_table(rows, ttas)
    write_csv(table, out / "metrics.csv")
    write_csv(per_class_table(full), out / "per_class.csv")
    analysed = choose_analysed(full, runs)
    write_error_analysis(out, analysed, full, data, ttas)
    write_visualisations(out, runs, data)
    write_readme(out, s, analysed, epochs, ttas)
    print(f"\nPrivateTest ({len(data.test)} images, {int(rows[0]['n_duplicates'])} duplicated in Training), "
          f"{len(runs)} runs, {time.perf_counter() - start:.0f} s:")
    print_table(table)
    print(f"\nfinal results: {out} (error analysis of {analysed})")
    return out


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """The `python -m search.final` command line; its flags default to the experiment's settings.json."""
    p = _Parser(prog="python -m search.final",
                description="Run the final stage alone on a finished or interrupted experiment: retrain the best "
                            "configurations and evaluate them on PrivateTest. Flags left out keep the values in "
                            "the experiment's settings.json.")
    p.add_argument("experiment", help="the experiment folder, e.g. results/<name>")
    add_final_flags(p)
    p.add_argument("--address", default=None,
                   help="address of a running Ray cluster ('' for a local instance; default: the experiment's)")
    p.add_argument("--data", default=None,
                   help="data for this stage, holding the search's Training and PublicTest (default: the experiment's)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier final stage of this experiment")
    p.add_argument("--cpus-per-trial", type=int, default=None, help="CPU cores per run (default: the experiment's)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per run, e.g. 0 to finish a GPU experiment on a CPU machine (default: the experiment's)")
    # None marks a flag left out, so settings.json decides (the shared help text names the search's defaults).
    p.set_defaults(final_top_k=None, final_epochs=None, final_seeds=None, beta=None, final_tta=None)
    return p


def read_settings(experiment: Path) -> Settings:
    """The experiment's settings.json, re-pointed at where the folder is now."""
    path = experiment / "settings.json"
    if not path.is_file():
        raise UserError(f"{experiment} is not an experiment folder (no settings.json); pass results/<name>")
    try:
        s = Settings.from_json(path.read_text())
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} is not a valid settings file ({err})") from None
    return dataclasses.replace(s, results=str(experiment.parent), name=experiment.name)


def parse_final(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    """Flags + settings.json -> the Settings of this stage, and the parsed flags (for --overwrite)."""
    a = build_parser().parse_args(argv)
    experiment = Path(a.experiment)
    s = read_settings(experiment)
    overrides = {key: getattr(a, key) for key in ("final_top_k", "final_epochs", "final_seeds", "beta", "address",
                                                  "data", "cpus_per_trial", "gpus_per_trial")
                 if getattr(a, key) is not None}
    if a.final_tta is not None:
        overrides["final_tta"] = tuple(a.final_tta)
    s = dataclasses.replace(s, **overrides)
    check_settings(s)
    return s, a


def final_command(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, refuse to replace an earlier final stage unless asked, run the stage; returns 0."""
    s, flags = parse_final(argv)
    if (s.experiment_dir / FINAL_DIR / "metrics.csv").exists() and not flags.overwrite:
        raise UserError(f"{s.experiment_dir / FINAL_DIR} already holds a final stage; add --overwrite to replace it")
    run_final(s, load_trials(s.experiment_dir, s.max_epochs))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: a user error is one line on stderr and exit status 2 (Ctrl-C: 130)."""
    return run_cli(final_command, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Pictures of the search: the anytime curve, every trial's learning curve, and what the hyperparameters did.

Built from the experiment folder alone: Tune's per-trial `result.json` (one row per epoch),
`trials.csv` (each trial's outcome) and the Optuna study in `optuna.db` (`search.tuning.study`).
An experiment from before `optuna.db` existed gets a study rebuilt from `trials.csv`, each
config replayed through its space as `--warm-start` does.

The importance, slice and parallel-coordinates plots are Optuna's own
(`optuna.visualization.matplotlib`), with importances from Optuna's fANOVA evaluator
(`FanovaImportanceEvaluator`: a random forest fitted to the trials, and the share of the
objective's variance each hyperparameter explains). Optuna draws them through pyplot, so
each figure is closed once saved; the curves are plain matplotlib `Figure`s, as in
`search.figures.plots`. Every function returns a one-line caption, or raises `NoData` saying
why the figure cannot be drawn yet.
"""
from __future__ import annotations

import math
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from search.figures.plots import save_figure
from search.tuning.records import read_results
from search.tuning.settings import Settings
from search.tuning.storage import TUNE_DIR, resolve, tune_location
from search.tuning.study import TRIAL_ATTR, load_study
from trainables.metrics import METRIC

IMPORTANCE_SEED = 0      # fANOVA's forest is random: a fixed seed gives the same bars on every run
MOST_IMPORTANT = 4       # hyperparameters shown against the objective
PARALLEL_PARAMS = 6
HISTORY_KEYS = ("training_iteration", "epoch", "val_acc", METRIC, "diverged", "timestamp", "time_total_s")


class NoData(Exception):
    """A figure the experiment has no data for yet; the message says why."""


# --------------------------------------------------------------------------- reading the experiment

def trial_histories(experiment_dir: Path, storage: str = "") -> pd.DataFrame:
    """One row per reported epoch of every trial: trial_id and the `HISTORY_KEYS` of its result.json.

    Read from the experiment folder's own `tune/` when it has one (a folder copied back from a
    cluster's --storage), else from --storage; a storage that cannot be read is NoData.
    """
    import pyarrow.fs as pafs

    local = Path(experiment_dir) / TUNE_DIR
    try:
        fs, root = resolve(str(local) if local.is_dir() else tune_location(experiment_dir, storage))
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (OSError, ValueError) as err:  # pyarrow's I/O and URI errors
        raise NoData(f"the trials' results at {tune_location(experiment_dir, storage)} cannot be read here "
                     f"({err})") from err
    rows = []
    for info in infos:
        name = info.base_name
        if info.type == pafs.FileType.Directory and name.startswith("trial_"):
            for r in read_results(fs, info.path):
                rows.append({"trial_id": name.removeprefix("trial_"), **{k: r.get(k, math.nan) for k in HISTORY_KEYS}})
    return pd.DataFrame(rows, columns=["trial_id", *HISTORY_KEYS])


def study_of(experiment_dir: Path, s: Settings, trials: pd.DataFrame, history: pd.DataFrame | None = None):
    """The experiment's Optuna study: `optuna.db`, or rebuilt in memory from `trials.csv` and the trials'
    per-epoch objectives in `history` (older experiments)."""
    study = load_study(experiment_dir)
    if study is not None or trials.empty:
        return study
    import optuna

    from search.tuning.warm_start import replay
    from spaces import get_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    offer_weights = "config/pretrained" in trials.columns
    space = partial(get_space(s.space), ferplus=s.labels == "ferplus", offer_weights=offer_weights,
                    votes="config/ferplus_votes" in trials.columns)
    for _, row in trials.iterrows():
        config = {c.removeprefix("config/"): _plain(v) for c, v in row.items()
                  if c.startswith("config/") and not pd.isna(v)}
        if not math.isfinite(float(row.get("objective", math.nan))):
            continue
        try:
            params, dists = replay(space, config)
        except ValueError:  # the space changed since: leave the trial out
            continue
        steps = {} if history is None else {
            int(h.training_iteration): float(getattr(h, METRIC))
            for h in history[history["trial_id"] == str(row["trial_id"])].itertuples()
            if math.isfinite(float(getattr(h, METRIC)))}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(row["objective"]),
                                                  intermediate_values=steps,
                                                  user_attrs={TRIAL_ATTR: str(row["trial_id"])}))
    return study


def _plain(value: Any) -> Any:
    """A value read back from CSV as the space drew it (numpy scalars to Python; 3.0 to 3 for integers)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# --------------------------------------------------------------------------- the curves

def plot_anytime(history: pd.DataFrame, path: Path) -> str:
    """Best objective so far against cumulative trial epochs and against wall time since the first trial."""
    h = history.dropna(subset=[METRIC, "timestamp"])
    if h.empty:
        raise NoData("no trial has finished an epoch yet")
    h = h.sort_values(["timestamp", "time_total_s"]).reset_index(drop=True)
    best = h[METRIC].cummax().to_numpy()
    epochs = np.arange(1, len(h) + 1)
    start = (h["timestamp"] - h["time_total_s"].fillna(0)).min()
    minutes = (h["timestamp"] - start).to_numpy() / 60
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    for ax, x, label in ((left, epochs, "trial epochs (cumulative)"), (right, minutes, "wall time (minutes)")):
        ax.scatter(x, h[METRIC], s=10, color="0.7", label="one trial epoch")
        ax.step(x, best, where="post", color="C0", linewidth=2, label="best so far")
        ax.set_xlabel(label)
        ax.set_ylabel("objective (PublicTest accuracy)")
        ax.grid(alpha=0.3)
    left.legend(loc="lower right", fontsize=8)
    fig.suptitle("anytime performance of the search", fontsize=10)
    save_figure(fig, path)
    return (f"Best PublicTest accuracy found so far: {best[-1]:.1%} after {len(h)} trial epochs and "
            f"{minutes[-1]:.1f} minutes; grey dots are single epochs of any trial.")


_GROUPS = (("COMPLETED", "ran to --max-epochs"), ("STOPPED", "stopped early by ASHA"))


def plot_learning_curves(history: pd.DataFrame, trials: pd.DataFrame, path: Path) -> str:
    """PublicTest accuracy per epoch of every trial, in one panel per outcome (ran on, stopped, other)."""
    if history.empty:
        raise NoData("no trial has finished an epoch yet")
    status = dict(zip(trials["trial_id"].astype(str), trials["status"])) if not trials.empty else {}
    groups = {key: [] for key, _ in _GROUPS}
    groups["other"] = []
    for trial_id, h in history.sort_values("training_iteration").groupby("trial_id"):
        groups.get(status.get(str(trial_id), "other"), groups["other"]).append(h)
    titles = dict(_GROUPS) | {"other": "failed, diverged or unfinished"}
    shown = [k for k in groups if groups[k] or k != "other"]
    fig = Figure(figsize=(4.2 * len(shown), 3.6), layout="constrained")
    axes = fig.subplots(1, len(shown), sharey=True, squeeze=False)[0]
    for ax, key in zip(axes, shown):
        for h in groups[key]:
            ax.plot(h["training_iteration"], h["val_acc"], marker="o", markersize=3, linewidth=1, alpha=0.8)
        ax.set_title(f"{titles[key]} ({len(groups[key])})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PublicTest accuracy")
    fig.suptitle("learning curves of every trial", fontsize=10)
    save_figure(fig, path)
    return (f"PublicTest accuracy per epoch: {len(groups['COMPLETED'])} trials ran to the last epoch, "
            f"{len(groups['STOPPED'])} were stopped early by ASHA at a rung"
            + (f", {len(groups['other'])} failed, diverged or did not finish." if groups["other"] else "."))


# --------------------------------------------------------------------------- Optuna's plots

def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def importances(study) -> dict[str, float]:
    """fANOVA importance of each hyperparameter every finished trial has, largest first; NoData with < 3 trials."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    if study is None or _finished(study) < 3:
        raise NoData(f"importance needs at least 3 finished trials; the study has "
                     f"{0 if study is None else _finished(study)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=IMPORTANCE_SEED)))
    except (ValueError, RuntimeError) as err:  # e.g. no hyperparameter took two values
        raise NoData(f"Optuna could not compute importances: {err}") from err


def at_epoch(study, epoch: int):
    """A copy of `study` whose trials' values are their objective at `epoch` (trials that reached it only).

    Under ASHA a stopped trial's final objective comes from fewer epochs than a promoted one's,
    so importance of the final objective partly measures which trials ASHA kept; at the first
    rung every judged trial has trained equally long.
    """
    import optuna
    from optuna.trial import TrialState

    same = optuna.create_study(direction="maximize")
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if epoch in t.intermediate_values and math.isfinite(t.intermediate_values[epoch]):
            same.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions,
                                                     value=t.intermediate_values[epoch]))
    return same


def _optuna_figure(draw, path: Path, size: tuple[float, float] | None = None) -> None:
    """Run one of Optuna's matplotlib plots and save its figure; pyplot's figure is closed afterwards."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a driver or a test; Optuna draws through pyplot
    import matplotlib.pyplot as plt

    # Optuna switches pyplot's global style (ggplot); rc_context puts it back for every later figure.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        axes = draw()
        fig = np.ravel(axes)[0].figure
        if size:
            fig.set_size_inches(*size)
        try:
            save_figure(fig, path)
        finally:
            plt.close(fig)


def plot_importance(study, ranked: dict[str, float], path: Path) -> str:
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization.matplotlib import plot_param_importances

    _optuna_figure(lambda: plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=IMPORTANCE_SEED)),
                   path)
    top = ", ".join(f"{k} {v:.0%}" for k, v in list(ranked.items())[:3])
    return (f"Share of the objective's variance each hyperparameter explains (Optuna's fANOVA evaluator, "
            f"{_finished(study)} finished trials): {top}.")


def plot_top_params(study, ranked: dict[str, float], path: Path) -> str:
    from optuna.visualization.matplotlib import plot_slice

    params = list(ranked)[:MOST_IMPORTANT]
    _optuna_figure(lambda: plot_slice(study, params=params), path)
    return f"The objective of every finished trial against the {len(params)} most important hyperparameters."


def plot_parallel(study, ranked: dict[str, float], path: Path) -> str:
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    params = list(ranked)[:PARALLEL_PARAMS]
    _optuna_figure(lambda: plot_parallel_coordinate(study, params=params), path, size=(2.0 + 1.6 * len(params), 4.5))
    return (f"Each finished trial as a line through its values of the {len(params)} most important "
            f"hyperparameters, coloured by its objective.")


# --------------------------------------------------------------------------- accuracy against cost

def pareto_mask(cost: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Which points are on the Pareto front: no other point is at most as costly and strictly more accurate,
    or strictly cheaper and at least as accurate."""
    cost, accuracy = np.asarray(cost, float), np.asarray(accuracy, float)
    keep = np.ones(len(cost), bool)
    for i in range(len(cost)):
        better = (cost <= cost[i]) & (accuracy >= accuracy[i]) & ((cost < cost[i]) | (accuracy > accuracy[i]))
        keep[i] = not better.any()
    return keep


def plot_pareto(trials: pd.DataFrame, exported: dict[str, str], path: Path, limit: float = 0.0) -> str:
    """PublicTest accuracy of every trained trial against its latency for one face and its parameters, the
    Pareto front of each drawn, the trials of the exported models (`exported`: trial id -> label) marked,
    and --max-latency-ms (`limit`) as a line."""
    if "latency_ms" not in trials:
        raise NoData("trials.csv has no latency_ms (an experiment from before trials measured it)")
    t = trials.assign(latency_ms=pd.to_numeric(trials["latency_ms"], errors="coerce"),
                      params=pd.to_numeric(trials["params"], errors="coerce"),
                      val_acc=pd.to_numeric(trials["val_acc"], errors="coerce"))
    done = t.dropna(subset=["latency_ms", "val_acc"])
    if done.empty:
        raise NoData("no trial has both a latency and a PublicTest accuracy yet")
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    fronts = {}
    for ax, column, label in ((axes[0], "latency_ms", "latency for one face (ms, batch 1, one CPU thread)"),
                              (axes[1], "params", "parameters (millions)")):
        d = done.dropna(subset=[column])
        scale = 1e-6 if column == "params" else 1.0
        x, y = d[column].to_numpy() * scale, d["val_acc"].to_numpy()
        ax.scatter(x, y, s=14, color="0.65", label="trial")
        front = pareto_mask(x, y)
        order = np.argsort(x[front])
        ax.step(x[front][order], y[front][order], where="post", color="C0", linewidth=1.5, label="Pareto front")
        fronts[column] = int(front.sum())
        for k, (trial_id, name) in enumerate(exported.items()):
            row = d[d["trial_id"].astype(str) == str(trial_id)]
            if len(row):
                ax.scatter(row[column] * scale, row["val_acc"], s=90, marker="*", color=f"C{k + 1}", zorder=3,
                           label=name)
        if column == "latency_ms" and limit:
            ax.axvline(limit, color="C3", linestyle="--", linewidth=1, label=f"--max-latency-ms {limit:g}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PublicTest accuracy (trial)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("accuracy against cost, every trained trial", fontsize=10)
    save_figure(fig, path)
    over = int((t["status"] == "OVER_LATENCY").sum()) if "status" in t else 0
    return (f"{len(done)} trials: PublicTest accuracy of each (its trial, not its final retraining) against its "
            f"latency for one face and its parameters; {fronts['latency_ms']} trials on the latency front, "
            f"{fronts.get('params', 0)} on the parameters front; stars: the trials of the exported models"
            + (f"; {over} trial(s) over --max-latency-ms {limit:g} were not trained" if limit else "") + ".")

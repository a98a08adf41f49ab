"""Read a Ray Tune experiment folder back as `TrialRecord`s and write `trials.csv` (one row per trial)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from search.tuning.storage import read_text, resolve, tune_location, tune_started
from trainables.config import as_fractions, in_epochs
from trainables.errors import last_line
from trainables.files import write_csv
from trainables.metrics import METRIC

# Ray's statuses of trials an interrupted search left unfinished (--resume continues them). The
# finished ones become COMPLETED, STOPPED, DIVERGED or ERROR; the README explains each.
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")


def _reported(default):
    """A `TrialRecord` field read from the trial's last result under the field's own name."""
    return field(default=default, metadata={"reported": True})


def _filesystem(trial):
    """The pyarrow filesystem a trial's folder is on (Tune's storage; the local disk by default)."""
    import pyarrow.fs as pafs

    return getattr(getattr(trial, "storage", None), "storage_filesystem", None) or pafs.LocalFileSystem()


def read_results(fs, trial_dir: str) -> list[dict]:
    """The rows of a trial's result.json (one per reported epoch), up to a line a kill cut short."""
    text = read_text(fs, f"{trial_dir}/result.json")
    if not text:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            break
    return rows


def trial_status(ray_status: str, last: dict, epochs: int, max_epochs: int) -> str:
    """trials.csv's status: ERROR, OVER_LATENCY (slower than --max-latency-ms, not trained), DIVERGED,
    COMPLETED (all `max_epochs` trained), STOPPED (ended early by ASHA or the time budget), else Tune's own
    (RUNNING, PENDING, PAUSED)."""
    if ray_status == "ERROR":
        return "ERROR"
    if last.get("over_latency"):
        return "OVER_LATENCY"
    if last.get("diverged"):
        return "DIVERGED"
    if ray_status == "TERMINATED":
        return "COMPLETED" if epochs >= max_epochs else "STOPPED"
    return ray_status


def error_text(trial) -> str:
    text = read_text(_filesystem(trial), f"{trial.path}/error.txt") if trial.path else None
    local = Path(getattr(trial, "error_file", "") or "")
    if not text and local.is_file():
        text = local.read_text()
    return last_line(text or "")  # the exception line of Ray's traceback, short and single-line


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the search left it: its outcome, its last reported figures, and Tune's own config dict.

    The fields, in order, are trials.csv's leading columns (then one `config/<key>` column per
    hyperparameter). A field marked `reported` is read under its own name from the trial's last
    result (what `trainables.tune_trainable` reports), NaN or "" where the trial never reported it.
    """

    trial_id: str
    status: str
    objective: float        # the search objective it last reported (what Optuna was told)
    val_acc: float          # the best PublicTest accuracy of its finite epochs
    epochs: int
    seconds: float = _reported(math.nan)
    node_id: str = _reported("")
    val_loss: float = _reported(math.nan)
    train_loss: float = _reported(math.nan)
    train_acc: float = _reported(math.nan)
    images_per_s: float = _reported(math.nan)
    epoch_seconds: float = math.nan         # wall seconds of its last epoch (Tune's time_this_iter_s)
    found_lr: float = _reported(math.nan)            # the rate its LR range test found (lr_mode=range_test)
    range_test_images: float = _reported(math.nan)   # images the LR range test trained on (0: skipped)
    range_test_seconds: float = _reported(math.nan)
    range_test_note: str = _reported("")             # why it was skipped, if it was
    params: float = _reported(math.nan)              # the model's parameters (trainables.latency)
    latency_ms: float = _reported(math.nan)          # one face, batch 1, one CPU thread
    latency_runtime: str = _reported("")             # onnxruntime, or pytorch where the export failed
    error: str = ""
    config: dict = field(default_factory=dict)


# trials.csv's leading columns, and the fields read from a trial's last result under their own names.
COLUMNS = [f.name for f in dataclasses.fields(TrialRecord) if f.name != "config"]
REPORTED = {f.name: f.default for f in dataclasses.fields(TrialRecord) if f.metadata.get("reported")}


def load_trials(experiment_dir: Path, max_epochs: int, storage: str = "") -> list[TrialRecord]:
    """Every trial of the experiment `experiment_dir` (its Tune folder under `storage` when given),
    best objective first (NaN last)."""
    trials = _tune_trials(experiment_dir, storage)
    if any(in_epochs(t.config) for t in trials):
        print(f"note: {experiment_dir} is from an older version, with schedule settings in epochs; its "
              f"configurations are read with them as fractions of its {max_epochs}-epoch trials (the same shape)")
    return records_of(trials, max_epochs)


def schedule_in_epochs(experiment_dir: Path, storage: str = "") -> bool:
    """Whether the experiment's trials were configured with schedule settings in epochs (an older version)."""
    return any(in_epochs(t.config) for t in _tune_trials(experiment_dir, storage))


def _tune_trials(experiment_dir: Path, storage: str = "") -> list:
    """Tune's Trial objects of the experiment, read back from its Tune folder (none before the search started)."""
    from ray.tune import ExperimentAnalysis  # Ray only where the experiment is read

    if not tune_started(experiment_dir, storage):
        return []
    fs, path = resolve(tune_location(experiment_dir, storage))
    return ExperimentAnalysis(path, storage_filesystem=fs).trials


def records_of(trials, max_epochs: int, *, ray_status: dict[str, str] | None = None) -> list[TrialRecord]:
    """`TrialRecord`s of Tune `Trial` objects (read back from disk, or live in the driver), best first.

    `ray_status` overrides Tune's status of some trials (one that is finishing as a callback
    runs still says RUNNING).
    """
    records = []
    for trial in trials:
        status = (ray_status or {}).get(trial.trial_id, trial.status)
        results = read_results(_filesystem(trial), trial.path) if trial.path else []
        live = getattr(trial, "last_result", None) or {}
        if live.get("epoch") and live.get("training_iteration") not in [r.get("training_iteration") for r in results]:
            results.append(live)  # reported, not yet flushed to result.json
        last = results[-1] if results else {}
        finite = [r for r in results if not r.get("diverged")]
        epochs = max((r.get("epoch", 0) for r in finite), default=0)
        best = max((r.get("val_acc", math.nan) for r in finite), default=math.nan)
        records.append(TrialRecord(
            trial_id=trial.trial_id, status=trial_status(status, last, epochs, max_epochs),
            objective=last.get(METRIC, math.nan), val_acc=best, epochs=epochs,
            **{name: last.get(name, default) for name, default in REPORTED.items()},
            epoch_seconds=last.get("time_this_iter_s", math.nan),
            error=error_text(trial) if status == "ERROR" else last.get("error", ""),
            config=as_fractions(trial.config, max_epochs)))
    return sorted(records, key=lambda r: -r.objective if math.isfinite(r.objective) else math.inf)


def trials_table(records: list[TrialRecord]) -> pd.DataFrame:
    """trials.csv: the leading columns, then one `config/<key>` column per hyperparameter any trial set."""
    rows = []
    for r in records:
        row = {k: getattr(r, k) for k in COLUMNS}
        row.update({f"config/{k}": v for k, v in sorted(r.config.items())})
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS + sorted({k for r in rows for k in r} - set(COLUMNS)))


def write_trials_csv(experiment_dir: Path, max_epochs: int, *, failed: dict[str, str] | None = None,
                  storage: str = "") -> list[TrialRecord]:
    """Write `<experiment_dir>/trials.csv` atomically and return the trials it holds.

    `failed` (trial id -> error) marks trials that failed after Tune's last snapshot as ERROR.
    """
    records = load_trials(experiment_dir, max_epochs, storage)
    if failed:
        records = [dataclasses.replace(r, status="ERROR", error=r.error or failed[r.trial_id])
                   if r.trial_id in failed else r for r in records]
    write_csv(trials_table(records), Path(experiment_dir) / "trials.csv")
    return records

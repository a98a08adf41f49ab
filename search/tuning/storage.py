"""Where Ray Tune keeps an experiment, and reading it back through one filesystem layer (`pyarrow.fs`).

By default Tune's part of an experiment lives in `results/<name>/tune/` on the driver's disk.
On a multi-node cluster every node must write to storage they all share, so `--storage URI`
(`s3://bucket/prefix`, `gs://...`, `file:///shared/path` or a plain NFS path) moves it to
`<URI>/<name>/tune/`; Ray's `storage_path` writes there, and `trials.csv`, `--resume`,
`--warm-start` and the final stage read it back from there with `pyarrow.fs`, whatever the
scheme. `settings.json`, `trials.csv` and `final/` stay in `results/<name>/` on the driver.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

TUNE_DIR = "tune"  # Ray's part of an experiment: <storage>/<name>/tune/


def has_scheme(uri: str) -> bool:
    return "://" in uri


def experiment_root(experiment_dir: Path, storage: str = "") -> str:
    """Ray's `storage_path` for the experiment: `<storage>/<name>` or the experiment folder itself."""
    if storage and has_scheme(storage):
        return f"{storage.rstrip('/')}/{Path(experiment_dir).name}"
    if storage:
        return str(Path(storage).resolve() / Path(experiment_dir).name)
    return str(Path(experiment_dir).resolve())


def tune_location(experiment_dir: Path, storage: str = "") -> str:
    """The URI (or local path) of the experiment's Tune folder."""
    return f"{experiment_root(experiment_dir, storage)}/{TUNE_DIR}"


def resolve(uri: str):
    """`uri` -> (pyarrow filesystem, path inside it); a plain path is the local filesystem."""
    import pyarrow.fs as pafs

    if has_scheme(uri):
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pafs.pyarrow.ArrowInvalid, pafs.pyarrow.ArrowNotImplementedError, OSError, ValueError) as err:
            from trainables.errors import UserError

            raise UserError(f"--storage {uri}: {str(err).strip().splitlines()[0]}") from None
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def tune_started(experiment_dir: Path, storage: str = "") -> bool:
    """Whether Tune has written the experiment's state (so there is something to resume or read)."""
    import pyarrow.fs as pafs

    fs, path = resolve(tune_location(experiment_dir, storage))
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return False
    return any(Path(i.path).name.startswith("experiment_state-") for i in infos)


def read_text(fs, path: str) -> str | None:
    """The text of `path` in `fs`, or None when it does not exist (or cannot be read)."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8", errors="replace")
    except (FileNotFoundError, OSError):
        return None


def saved_latest_checkpoints(fs, tune_path: str) -> dict[str, str | None] | None:
    """Trial id -> the checkpoint folder Tune's saved experiment state names as the trial's latest, None
    where its last result came without one; None when no state can be read (none yet, or one being
    rewritten). This is what `--resume` restores each unfinished trial from.
    """
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(tune_path, allow_not_found=True))
    except OSError:
        return None
    states = sorted(i.path for i in infos if Path(i.path).name.startswith("experiment_state-"))
    text = read_text(fs, states[-1]) if states else None
    try:
        latest = {}
        for trial_json, run_json in json.loads(text)["trial_data"]:
            last = json.loads(run_json).get("last_result") or {}
            latest[json.loads(trial_json)["trial_id"]] = last.get("checkpoint_dir_name")
        return latest
    except (TypeError, ValueError, KeyError):  # no state yet, or a copy caught mid-write
        return None


def prune_checkpoints(fs, tune_path: str, trial_ids: Iterable[str] | None = None) -> set[str]:
    """Delete the checkpoints of `trial_ids` (default: every trial) older than the one Tune's saved
    experiment state names as each trial's latest; returns the trials left with that one alone.

    Tune's own `CheckpointConfig(num_to_keep=1)` deletes a trial's previous checkpoint as soon as the
    next is registered, but saves the experiment state that names the new one only every 10 s or
    more: a driver killed in between left a state whose latest checkpoint was gone, and --resume
    failed that trial ("Could not recover from checkpoint as it does not exist on storage anymore").
    Deleting only what the saved state has superseded closes that window.
    """
    import pyarrow.fs as pafs

    latest = saved_latest_checkpoints(fs, tune_path)
    if latest is None:
        return set()
    alone = set()
    for tid in latest if trial_ids is None else [t for t in trial_ids if t in latest]:
        named = latest[tid]
        if not named:
            continue
        try:
            infos = fs.get_file_info(pafs.FileSelector(f"{tune_path}/trial_{tid}", allow_not_found=True))
        except OSError:
            continue
        folders = sorted(i.path for i in infos if i.type == pafs.FileType.Directory
                         and Path(i.path).name.startswith("checkpoint_"))
        for path in folders:
            if Path(path).name < named:
                try:
                    fs.delete_dir(path)
                except (FileNotFoundError, OSError):
                    pass
        if not folders or Path(folders[-1]).name == named:
            alone.add(tid)
    return alone

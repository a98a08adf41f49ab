"""Where Ray Tune keeps an experiment, and reading it back through one filesystem layer (`pyarrow.fs`).

By default Tune's part of an experiment lives in `results/<name>/tune/` on the driver's disk.
On a multi-node cluster every node must write to storage they all share, so `--storage URI`
(`s3://bucket/prefix`, `gs://...`, `file:///shared/path` or a plain NFS path) moves it to
`<URI>/<name>/tune/`; Ray's `storage_path` writes there, and `trials.csv`, `--resume`,
`--warm-start` and the final stage read it back from there with `pyarrow.fs`, whatever the
scheme. `settings.json`, `trials.csv` and `final/` stay in `results/<name>/` on the driver.
"""
from __future__ import annotations

from pathlib import Path

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

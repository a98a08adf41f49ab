"""The Kaggle `fer2013.csv` (emotion,pixels,Usage): a validating parser and a binary cache beside it.

The CSV is parsed once, vectorised, and cached as one `.npz` per split in `<file>.cache/`
(or `~/.cache/fer-search/<sha1 of path>/` when that folder is read-only), keyed by the
file's size and mtime; only the requested splits' pixels are parsed or read. Every
malformed row is a `UserError` naming the file and line.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import torch

from trainables.data.splits import EMOTIONS, NPIX, SIDE, SPLITS, Split
from trainables.errors import UserError
from trainables.files import atomic_path

CSV_COLUMNS = ("emotion", "pixels", "Usage")
_CACHE_VERSION = 1
_CHUNK_ROWS = 4096          # rows per vectorised pixel parse: bounds memory to ~100 MB
_LABEL_STRINGS = tuple(str(i) for i in range(len(EMOTIONS)))


def load_csv(path: Path, splits: tuple[str, ...], cache: bool) -> tuple[dict[str, Split], int]:
    """Return the requested splits and the CSV's data-row count, from the cache when it is fresh."""
    key = _source_key(path)
    found, n_rows = _read_cache(path, key, splits) if cache else ({}, None)
    missing = tuple(s for s in splits if s not in found)
    if missing:
        parsed, n_rows = _parse_csv(path, missing)
        if cache:
            _write_cache(path, key, n_rows, parsed)
        found.update(parsed)
    assert n_rows is not None
    return {s: found[s] for s in splits}, n_rows


def _parse_csv(path: Path, splits: tuple[str, ...]) -> tuple[dict[str, Split], int]:
    """Parse a Kaggle fer2013.csv: validate labels and Usage of every row, pixels of `splits` only."""
    _check_csv_start(path)
    df, lines = _read_table(path)
    emotion = _check_column(df["emotion"].str.strip(), lines, path, "emotion", _LABEL_STRINGS)
    usage = _check_column(df["Usage"].str.strip(), lines, path, "Usage", SPLITS)
    pixels = df["pixels"].to_numpy()
    out = {}
    for name in splits:
        idx = np.flatnonzero(usage == name)
        if len(idx) == 0:
            raise UserError(f"split {name} has no rows in {path} (its Usage column never says {name})")
        x = _parse_pixels(pixels[idx], lines[idx], path)
        y = emotion[idx].astype(np.int64)
        out[name] = Split(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(idx.astype(np.int64)))
    return out, len(df)


def _check_csv_start(path: Path) -> None:
    """Fail early and clearly on an empty, binary or wrongly-headed file (the cheap checks)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise UserError(f"{path} is empty; expected the Kaggle fer2013.csv (header emotion,pixels,Usage)")
    first = head.split(b"\n", 1)[0]
    if b"\0" in head:
        line = head.count(b"\n", 0, head.index(b"\0")) + 1
        raise UserError(f"{path}, line {line}: binary data (NUL byte); expected the Kaggle fer2013.csv text file")
    try:
        header = first.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}, line 1: not UTF-8 text; expected the Kaggle fer2013.csv") from None
    columns = [c.strip() for c in header.strip().split(",")]
    if tuple(columns) != CSV_COLUMNS:
        raise UserError(f"{path}, line 1: header must be 'emotion,pixels,Usage' (Kaggle fer2013.csv), "
                        f"found {header.strip()[:80]!r}")


def _read_table(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Read the CSV as strings; return the non-blank rows and their 1-based file line numbers."""
    try:
        with warnings.catch_warnings():
            # pandas turns an extra field on the first data row into an index with only a
            # ParserWarning (data would shift silently), so make that warning an error.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            # dtype=object, not str: pandas 3's string dtype reads this file ~2x slower.
            df = pd.read_csv(path, dtype=object, names=list(CSV_COLUMNS), header=0, index_col=False,
                             skip_blank_lines=False, encoding="utf-8")
    except pd.errors.ParserWarning:
        raise UserError(f"{path}, line 2: expected 3 fields (emotion,pixels,Usage)") from None
    except pd.errors.ParserError as e:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        where = f"line {m.group(2)}: expected 3 fields (emotion,pixels,Usage), found {m.group(3)}" if m \
            else str(e).strip()
        raise UserError(f"{path}, {where}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}, line {_first_non_utf8_line(path)}: not UTF-8 text "
                        f"(binary data?); expected the Kaggle fer2013.csv") from None
    blank = df.isna().all(axis=1).to_numpy()   # blank lines: skipped, but they still count as lines
    lines = np.flatnonzero(~blank) + 2
    return df[~blank].reset_index(drop=True), lines


def _first_non_utf8_line(path: Path) -> int:
    """Find the 1-based line holding the first invalid UTF-8 byte (error path only)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 1


def _check_column(values: pd.Series, lines: np.ndarray, path: Path, column: str,
                  allowed: tuple[str, ...]) -> np.ndarray:
    """Check every value of a column is in `allowed`; name the first offending line otherwise."""
    ok = values.isin(allowed).to_numpy()
    if not ok.all():
        i = int(np.argmin(ok))
        value = values.iloc[i]
        what = f"{column} is missing" if not isinstance(value, str) else f"{column} {value!r} is not valid"
        raise UserError(f"{path}, line {lines[i]}: {what}; expected one of {', '.join(allowed)} "
                        f"(fix or delete that row)")
    return values.to_numpy(dtype=str)


def _parse_pixels(strings: np.ndarray, lines: np.ndarray, path: Path) -> np.ndarray:
    """Parse pixel strings to uint8 (N, 48, 48), chunk by chunk, vectorised when the chunk is clean."""
    out = np.empty((len(strings), NPIX), np.uint8)
    for start in range(0, len(strings), _CHUNK_ROWS):
        chunk = strings[start:start + _CHUNK_ROWS].tolist()
        values = _parse_chunk_fast(chunk)
        if values is None:  # something is off: rescan row by row to name the line (or parse odd spacing)
            values = _parse_chunk_slow(chunk, lines[start:start + _CHUNK_ROWS], path)
        out[start:start + len(chunk)] = values
    return out.reshape(-1, SIDE, SIDE)


def _parse_chunk_fast(chunk: list) -> np.ndarray | None:
    """Parse well-formed rows (single spaces, 2304 integers 0..255) in one C call; None if unsure."""
    if not all(isinstance(s, str) and s.count(" ") == NPIX - 1 for s in chunk):
        return None
    try:
        # int64 saturates on overflow (int32/int16 wrap silently), so the range check below holds.
        flat = np.fromstring(" ".join(chunk), dtype=np.int64, sep=" ")
    except ValueError:
        return None
    if flat.size != len(chunk) * NPIX or flat.min() < 0 or flat.max() > 255:
        return None
    return flat.astype(np.uint8).reshape(len(chunk), NPIX)


def _parse_chunk_slow(chunk: list, lines: np.ndarray, path: Path) -> np.ndarray:
    """Parse rows one by one, raising UserError naming the first bad line and value."""
    out = np.empty((len(chunk), NPIX), np.uint8)
    for i, (text, line) in enumerate(zip(chunk, lines)):
        where = f"{path}, line {line}"
        tokens = text.split() if isinstance(text, str) else []
        if len(tokens) != NPIX:
            raise UserError(f"{where}: {len(tokens)} pixel values, expected {NPIX} (48x48); fix or delete that row")
        try:
            values = [int(t) for t in tokens]   # Python ints: no overflow to hide a bad value
        except ValueError:
            bad = next(t for t in tokens if not re.fullmatch(r"[+-]?\d+", t))
            raise UserError(f"{where}: pixel value {bad[:20]!r} is not an integer 0..255") from None
        outside = next((v for v in values if not 0 <= v <= 255), None)
        if outside is not None:
            raise UserError(f"{where}: pixel value {str(outside)[:20]} is outside 0..255")
        out[i] = values
    return out


def _source_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _local_cache_dir(path: Path) -> Path:
    return path.with_name(path.name + ".cache")


def _home_cache_dir(path: Path) -> Path:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()
    return Path.home() / ".cache" / "fer-search" / digest


def _cache_dirs(path: Path) -> list[Path]:
    """Where the cache may live, in order of preference: beside the data, then the home cache."""
    return [_local_cache_dir(path), _home_cache_dir(path)]


def _read_meta(cache_dir: Path) -> dict | None:
    try:
        return json.loads((cache_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _fresh(meta: dict | None, key: dict[str, int]) -> bool:
    return bool(meta) and meta.get("version") == _CACHE_VERSION and all(meta.get(k) == v for k, v in key.items())


def _read_cache(path: Path, key: dict[str, int], splits: tuple[str, ...]) -> tuple[dict[str, Split], int | None]:
    """Load whichever requested splits a fresh cache holds (only their files are opened)."""
    for cache_dir in _cache_dirs(path):
        meta = _read_meta(cache_dir)
        if not _fresh(meta, key):
            continue
        found = {}
        for name in splits:
            if name in meta.get("splits", ()):
                split = _read_split(cache_dir / f"{name}.npz", key)
                if split is not None:
                    found[name] = split
        if found:
            return found, int(meta["n_rows"])
    return {}, None


def _read_split(file: Path, key: dict[str, int]) -> Split | None:
    """Read one cached split; None when it is missing, damaged or from another version of the CSV."""
    try:
        with np.load(file, allow_pickle=False) as z:
            # The key is stored in each file too, so a concurrent rewrite can never mix versions.
            if int(z["size"]) != key["size"] or int(z["mtime_ns"]) != key["mtime_ns"]:
                return None
            return Split(torch.from_numpy(z["x"]), torch.from_numpy(z["y"]), torch.from_numpy(z["rows"]))
    except Exception:  # noqa: BLE001 - any unreadable cache file just means "parse again"
        return None


def _write_cache(path: Path, key: dict[str, int], n_rows: int, parsed: dict[str, Split]) -> None:
    """Write one .npz per split plus meta.json, atomically, into the first writable cache dir."""
    for cache_dir in _cache_dirs(path):
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for name, s in parsed.items():
                arrays = dict(x=s.x.numpy(), y=s.y.numpy(), rows=s.rows.numpy(),
                              size=np.int64(key["size"]), mtime_ns=np.int64(key["mtime_ns"]))
                _atomic_write(cache_dir / f"{name}.npz", lambda f, a=arrays: np.savez(f, **a))
            old = _read_meta(cache_dir)
            kept = set(old.get("splits", ())) if _fresh(old, key) else set()
            meta = {"version": _CACHE_VERSION, **key, "source": str(path.resolve()), "n_rows": n_rows,
                    "splits": [s for s in SPLITS if s in kept | set(parsed)]}
            _atomic_write(cache_dir / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
            return
        except OSError:
            continue
    warnings.warn(f"could not write a cache for {path}; it will be parsed again next time", stacklevel=3)


def _atomic_write(target: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through a temporary file in the same directory, then rename over `target`."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)   # mkstemp makes 0600; other users of a shared data dir may read it


"""FER2013 data: load the Kaggle CSV or image folders (or FER+ labels, or demo faces) as uint8 tensors.

The protocol lives here: a split is parsed only when the caller names it, and the
search path asks for `SEARCH_SPLITS` (Training, PublicTest) only, so PrivateTest
pixels are never read (not even from the cache) until the final evaluation asks
for them. The CSV is parsed once and cached beside it as one `.npz` per split.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from trainables.errors import UserError
from trainables.files import atomic_path

EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FERPLUS_CLASSES: tuple[str, ...] = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
SPLITS = ("Training", "PublicTest", "PrivateTest")
SEARCH_SPLITS = ("Training", "PublicTest")   # the only ones the search path may read

LABEL_SETS = ("fer2013", "ferplus")
SIDE = 48
NPIX = SIDE * SIDE
CSV_COLUMNS = ("emotion", "pixels", "Usage")
FERPLUS_COLUMNS = ("Usage", "Image name", *FERPLUS_CLASSES, "unknown", "NF")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CACHE_VERSION = 1
_CHUNK_ROWS = 4096          # rows per vectorised pixel parse: bounds memory to ~100 MB
_LABEL_STRINGS = tuple(str(i) for i in range(len(EMOTIONS)))


# --------------------------------------------------------------------------- containers

@dataclass(frozen=True)
class Split:
    """One split held in memory: images, hard labels, source row indices and optional soft labels.

    `x` is uint8 (N, 48, 48), `y` int64 (N,), `rows` int64 (N,) is the 0-based data row in
    the source CSV (or the file order for image folders), and `soft` is float32 (N, C) with
    rows summing to 1 when the labels are FER+ vote distributions.
    """

    x: torch.Tensor
    y: torch.Tensor
    rows: torch.Tensor
    soft: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.x)
        lengths = [len(self.y), len(self.rows)] + ([] if self.soft is None else [len(self.soft)])
        if any(m != n for m in lengths):  # a bug in the caller, not a user error
            raise ValueError(f"Split fields differ in length: x has {n}, others {lengths}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: Any) -> Split:
        """Return the split restricted to `idx` (a slice, index array/list/tensor or bool mask)."""
        if not isinstance(idx, (torch.Tensor, slice)):
            idx = torch.as_tensor(np.asarray(idx))
            if idx.numel() == 0:
                idx = idx.long()   # np.asarray([]) is float64, which torch refuses as an index
        soft = None if self.soft is None else self.soft[idx]
        return Split(self.x[idx], self.y[idx], self.rows[idx], soft)


@dataclass(frozen=True)
class FERData:
    """The loaded splits (keys among `SPLITS`), their class names and where they came from."""

    classes: tuple[str, ...]
    splits: dict[str, Split]
    source: str

    def _get(self, name: str) -> Split:
        if name not in self.splits:
            loaded = ", ".join(self.splits) or "none"
            raise UserError(
                f"split {name} was not loaded from {self.source} (loaded: {loaded}); "
                f"pass splits=[..., '{name}'] to load_fer2013"
                + ("; PrivateTest is for the final evaluation only" if name == "PrivateTest" else ""))
        return self.splits[name]

    @property
    def train(self) -> Split:
        return self._get("Training")

    @property
    def val(self) -> Split:
        return self._get("PublicTest")

    @property
    def test(self) -> Split:
        return self._get("PrivateTest")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- entry point

def load_fer2013(path: str | os.PathLike, *, splits: Sequence[str] = SEARCH_SPLITS,
                 labels: str = "fer2013", ferplus_path: str | os.PathLike | None = None,
                 val_fraction: float = 0.1, seed: int = 0, cache: bool = True) -> FERData:
    """Load the requested FER2013 splits from "demo", a Kaggle `fer2013.csv`, or an image folder.

    Only the splits named in `splits` are parsed; the default is the search protocol's
    Training + PublicTest, so PrivateTest pixels are untouched unless asked for. A CSV
    (header `emotion,pixels,Usage`) is parsed once and cached as one `.npz` per split in
    `<file>.cache/` (or `~/.cache/fer-search/<sha1 of path>/` when that is not writable),
    keyed by the file's size and mtime. An image folder holds `train/<emotion>/*.png|jpg`,
    `test/<emotion>/*` and optionally `val/` or `validation/`: Training is `train/`,
    PublicTest is `val/` when present, else a stratified `val_fraction` slice of `train/`
    drawn with `seed` (and removed from Training), and PrivateTest is `test/`; folder rows
    number the files in (emotion, natural file name) order. `labels="ferplus"` replaces the
    7 FER2013 labels by the 8 FER+ classes from `ferplus_path` (default `fer2013new.csv`
    beside the CSV), see `_apply_ferplus`. Every data problem raises `UserError`.
    """
    names = _check_splits(splits)
    if labels not in LABEL_SETS:
        raise UserError(f"unknown labels {labels!r}; choose from {list(LABEL_SETS)}")
    if os.fspath(path) == "demo":
        if labels == "ferplus":
            raise UserError("FER+ labels need the real fer2013.csv, not the demo data")
        return make_demo(splits=names)
    src = Path(path).expanduser()
    if not src.exists():
        raise UserError(f"{path} does not exist; pass the Kaggle fer2013.csv, an image folder "
                        f"(train/<emotion>/*.png, test/<emotion>/*.png) or 'demo'")
    if src.is_dir():
        if labels == "ferplus":
            raise UserError(f"FER+ labels join by CSV row position, so they need fer2013.csv, "
                            f"not the image folder {path}")
        return FERData(EMOTIONS, _load_folder(src, names, val_fraction, seed), os.fspath(path))
    loaded, n_rows = _load_csv(src, names, cache)
    if labels == "ferplus":
        votes_path = Path(ferplus_path) if ferplus_path else src.with_name("fer2013new.csv")
        return FERData(FERPLUS_CLASSES, _apply_ferplus(loaded, n_rows, votes_path), os.fspath(path))
    return FERData(EMOTIONS, loaded, os.fspath(path))


def _check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    """Validate requested split names; return them in canonical `SPLITS` order."""
    if isinstance(splits, str):
        splits = (splits,)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise UserError(f"unknown split(s) {unknown or list(splits)}; choose from {list(SPLITS)}")
    return tuple(s for s in SPLITS if s in splits)


# --------------------------------------------------------------------------- CSV + cache

def _load_csv(path: Path, splits: tuple[str, ...], cache: bool) -> tuple[dict[str, Split], int]:
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


# --------------------------------------------------------------------------- FER+

def _apply_ferplus(splits: dict[str, Split], n_rows: int, votes_path: Path) -> dict[str, Split]:
    """Relabel FER2013 splits with FER+ votes, joined by row position (image names repeat).

    Hard label = the emotion with most votes among the 8 FER+ emotions (ties -> the lowest
    index in FERPLUS_CLASSES); `soft` = those 8 vote counts normalised to sum 1. A row is
    dropped when it has no emotion votes or when `unknown` or `NF` (not a face) has strictly
    more votes than every emotion (argmax over all 10 columns, ties favour the emotion). The
    `Image name` column is ignored: names are not row indices and four of them repeat.
    """
    usage, votes = _read_ferplus(votes_path, n_rows)
    out = {}
    for name, s in splits.items():
        rows = s.rows.numpy()
        disagree = np.flatnonzero(usage[rows] != name)
        if len(disagree):
            r = int(rows[disagree[0]])
            raise UserError(f"{votes_path}, line {r + 2}: Usage {usage[r]!r} but fer2013 row {r} is {name}; "
                            f"the FER+ file does not match this fer2013.csv")
        v = votes[rows]
        emo = v[:, :len(FERPLUS_CLASSES)]
        keep = (emo.sum(axis=1) > 0) & (v.argmax(axis=1) < len(FERPLUS_CLASSES))
        if not keep.any():
            raise UserError(f"split {name} has no rows with FER+ emotion votes in {votes_path}")
        emo = emo[keep].astype(np.float32)
        kept = s.subset(torch.from_numpy(np.flatnonzero(keep)))
        out[name] = Split(kept.x, torch.from_numpy(emo.argmax(axis=1).astype(np.int64)), kept.rows,
                          torch.from_numpy(emo / emo.sum(axis=1, keepdims=True)))
    return out


def _read_ferplus(path: Path, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Read fer2013new.csv: return Usage (N,) and the 10 vote columns (N, 10) as int64."""
    if not path.is_file():
        raise UserError(f"FER+ votes not found at {path}; download fer2013new.csv from "
                        f"github.com/microsoft/FERPlus there or pass ferplus_path")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; expected Microsoft's fer2013new.csv")
    try:
        df = pd.read_csv(path, dtype=object, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read as CSV ({str(e).strip()[:120]})") from None
    columns = tuple(c.strip() for c in df.columns)
    if columns != FERPLUS_COLUMNS:
        raise UserError(f"{path}, line 1: header must be {','.join(FERPLUS_COLUMNS)}, found {','.join(columns)[:120]}")
    if len(df) != n_rows:
        raise UserError(f"{path} has {len(df)} data rows but fer2013.csv has {n_rows}; FER+ joins by row "
                        f"position, so use the fer2013new.csv that matches this fer2013.csv")
    usage = df.iloc[:, 0].str.strip().to_numpy(dtype=str)
    raw = df.iloc[:, 2:].apply(lambda c: c.str.strip())
    ok = raw.apply(lambda c: c.str.fullmatch(r"\d+")).to_numpy(dtype=bool)
    if not ok.all():
        i, j = np.argwhere(~ok)[0]
        raise UserError(f"{path}, line {i + 2}: {FERPLUS_COLUMNS[j + 2]} vote {raw.iat[i, j]!r} is not a "
                        f"non-negative integer")
    return usage, raw.to_numpy(dtype=np.int64)


# --------------------------------------------------------------------------- image folders

def _load_folder(root: Path, splits: tuple[str, ...], val_fraction: float, seed: int) -> dict[str, Split]:
    """Load splits from `train/`, `val/`|`validation/` and `test/`; see load_fer2013 for the rules."""
    sub = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    val_dir = sub.get("val") or sub.get("validation")
    plan: dict[str, tuple[list[Path], np.ndarray, np.ndarray]] = {}   # files, labels, rows
    if "Training" in splits or ("PublicTest" in splits and val_dir is None):
        files, labels = _list_images(_need_dir(sub, "train", root))
        if val_dir is None:
            if not 0 < val_fraction < 1:
                raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
            val_idx = _stratified_indices(labels, val_fraction, np.random.default_rng(seed), for_val=True)
            train_idx = np.setdiff1d(np.arange(len(files)), val_idx)
            plan["PublicTest"] = ([files[i] for i in val_idx], labels[val_idx], val_idx)
        else:
            train_idx = np.arange(len(files))
        plan["Training"] = ([files[i] for i in train_idx], labels[train_idx], train_idx)
    if "PublicTest" in splits and val_dir is not None:
        files, labels = _list_images(val_dir)
        plan["PublicTest"] = (files, labels, np.arange(len(files)))
    if "PrivateTest" in splits:   # test/ is listed and opened only when asked for
        files, labels = _list_images(_need_dir(sub, "test", root))
        plan["PrivateTest"] = (files, labels, np.arange(len(files)))
    out = {}
    for name in splits:
        files, labels, rows = plan[name]
        if not files:
            raise UserError(f"split {name} has no rows in {root} (no images found)")
        x = np.stack([_read_image(f) for f in files])
        out[name] = Split(torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64)),
                          torch.from_numpy(np.asarray(rows, dtype=np.int64)))
    return out


def _need_dir(sub: dict[str, Path], name: str, root: Path) -> Path:
    if name not in sub:
        raise UserError(f"{root} has no {name}/ folder; expected {name}/<emotion>/*.png with emotion "
                        f"folders named {', '.join(EMOTIONS)}")
    return sub[name]


def _natural_key(name: str) -> tuple:
    """Sort '2.png' before '10.png' (the row-index file names some uploads use)."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name))


def _list_images(folder: Path) -> tuple[list[Path], np.ndarray]:
    """List `<emotion>/<image>` files (emotion names any case); hidden entries are ignored."""
    entries = []
    for d in sorted(folder.iterdir()):
        if d.name.startswith("."):
            continue
        if not d.is_dir() or d.name.lower() not in EMOTIONS:
            raise UserError(f"{d}: not an emotion folder; {folder} must hold one folder per emotion "
                            f"({', '.join(EMOTIONS)}, any case) and nothing else")
        label = EMOTIONS.index(d.name.lower())
        for f in d.iterdir():
            if f.name.startswith("."):
                continue
            if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"{f}: not an image (expected .png, .jpg or .jpeg); remove it")
            entries.append((label, _natural_key(f.name), f))
    entries.sort(key=lambda e: e[:2])
    return [e[2] for e in entries], np.array([e[0] for e in entries], dtype=np.int64)


def _read_image(file: Path) -> np.ndarray:
    """Read one 48x48 image as uint8 grayscale."""
    try:
        with Image.open(file) as im:
            if im.size != (SIDE, SIDE):
                raise UserError(f"{file}: image is {im.size[0]}x{im.size[1]}, expected 48x48; resize it first")
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{file}: not a readable image ({type(e).__name__}); remove or replace it") from None


# --------------------------------------------------------------------------- subsets and checks

def _stratified_indices(y: np.ndarray, fraction: float, rng: np.random.Generator, *, for_val: bool) -> np.ndarray:
    """Pick round(fraction * n_c) indices per class, sorted. At least 1 per class present; when
    `for_val`, also leave at least 1 per class behind (a 1-image class stays in Training)."""
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(1, int(round(fraction * len(idx))))
        if for_val:
            k = min(k, len(idx) - 1)
        picked.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def stratified_fraction(split: Split, fraction: float, *, seed: int) -> Split:
    """Return a seeded, class-stratified subset of about `fraction` of `split` (original order kept).

    Each class present keeps round(fraction * count) samples and at least one; `fraction`
    must be in (0, 1], and 1.0 returns `split` itself.
    """
    if not 0 < fraction <= 1:
        raise UserError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return split
    idx = _stratified_indices(split.y.numpy(), fraction, np.random.default_rng(seed), for_val=False)
    return split.subset(torch.from_numpy(idx))


def class_counts(split: Split, num_classes: int) -> torch.Tensor:
    """Return how many samples of each class `split` holds: int64 (num_classes,)."""
    return torch.bincount(split.y, minlength=num_classes).to(torch.int64)


def _image_digests(x: torch.Tensor) -> list[bytes]:
    flat = x.reshape(len(x), -1).contiguous().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def duplicate_mask(test: Split, train: Split) -> torch.Tensor:
    """Return bool (N_test,): True where a test image is pixel-identical to some train image."""
    seen = set(_image_digests(train.x))
    return torch.tensor([d in seen for d in _image_digests(test.x)], dtype=torch.bool)


# --------------------------------------------------------------------------- demo faces

_DEMO_WEIGHTS = np.array([1.0, 0.4, 1.0, 1.0, 1.0, 1.0, 1.0])   # disgust is rare, as in FER2013
# Per class: brow tilt (+: inner ends down), brow raise, eye height, mouth curve (+: smile),
# mouth openness, mouth skew. Neighbouring classes share features, so the task is not trivial.
_DEMO_SHAPES = np.array([
    [0.45, -0.04, 0.06, -0.10, 0.00, 0.00],   # angry: brows slant down to the middle, tight frown
    [0.20, -0.02, 0.05, -0.08, 0.03, 0.30],   # disgust: lowered brows, lopsided sneer
    [-0.35, 0.08, 0.10, -0.06, 0.08, 0.00],   # fear: worried brows, wide eyes, mouth ajar
    [0.00, 0.00, 0.06, 0.30, 0.04, 0.00],     # happy: big smile
    [-0.40, 0.02, 0.05, -0.25, 0.00, 0.00],   # sad: brows up in the middle, frown
    [0.00, 0.14, 0.10, 0.00, 0.16, 0.00],     # surprise: raised brows, round open mouth
    [0.00, 0.00, 0.06, 0.00, 0.00, 0.00],     # neutral: everything flat
])
_DEMO_NOISE = np.array([0.15, 0.04, 0.015, 0.09, 0.03, 0.10])  # per-sample spread of each feature


def make_demo(*, splits: Sequence[str] = SEARCH_SPLITS, n_train: int = 1400, n_val: int = 350,
              n_test: int = 350, seed: int = 0) -> FERData:
    """Generate deterministic cartoon faces (48x48 uint8) whose expression is learnable from shape.

    Brow angle and height, eye size and mouth curve/openness/skew depend on the class, with
    per-sample spread, position/scale/rotation jitter, brightness and noise, so a small
    ConvNet learns it well above chance but not at once. Classes are balanced except disgust
    (0.4x). Each split comes from its own seed stream, so splits hold distinct images and
    one split does not change when another is requested.
    """
    names = _check_splits(splits)
    sizes = dict(zip(SPLITS, (n_train, n_val, n_test)))
    streams = dict(zip(SPLITS, np.random.SeedSequence(seed).spawn(len(SPLITS))))
    out = {}
    for name in names:
        if sizes[name] < len(EMOTIONS):
            raise UserError(f"demo split {name} needs at least {len(EMOTIONS)} images, got {sizes[name]}")
        rng = np.random.default_rng(streams[name])
        y = rng.permutation(_demo_labels(sizes[name]))
        x = _draw_faces(y, rng)
        out[name] = Split(torch.from_numpy(x), torch.from_numpy(y), torch.arange(len(y), dtype=torch.int64))
    return FERData(EMOTIONS, out, "demo")


def _demo_labels(n: int) -> np.ndarray:
    """Exact class counts proportional to _DEMO_WEIGHTS (largest remainder), before shuffling."""
    share = n * _DEMO_WEIGHTS / _DEMO_WEIGHTS.sum()
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(counts - share)[: n - counts.sum()]] += 1
    return np.repeat(np.arange(len(EMOTIONS)), counts)


def _soft_mask(dist: np.ndarray, edge: np.ndarray) -> np.ndarray:
    """1 inside (dist < 0), 0 outside, with a one-pixel ramp so shapes are anti-aliased."""
    return np.clip(0.5 - dist / edge, 0.0, 1.0)


def _segment_dist(u: np.ndarray, v: np.ndarray, cx: float, cy: np.ndarray, slope: np.ndarray,
                  half: float) -> np.ndarray:
    """Distance from each (u, v) to the segment centred at (cx, cy) with the given slope."""
    norm = np.sqrt(1 + slope ** 2)
    dx, dy = 1 / norm, slope / norm
    t = np.clip((u - cx) * dx + (v - cy) * dy, -half, half)
    return np.hypot(u - cx - t * dx, v - cy - t * dy)


def _draw_faces(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render one face per label, vectorised over the batch (all shapes are (N, 48, 48))."""
    n = len(y)
    p = _DEMO_SHAPES[y] + rng.normal(size=(n, 6)) * _DEMO_NOISE
    col = lambda a: a.reshape(n, 1, 1).astype(np.float32)   # noqa: E731 - broadcast per sample
    tilt, raise_, eye, curve, opening, skew = (col(p[:, k]) for k in range(6))
    scale, angle = col(rng.uniform(0.8, 1.1, n)), col(rng.uniform(-0.2, 0.2, n))
    grid = (np.arange(SIDE, dtype=np.float32) + 0.5) / SIDE * 2 - 1
    gx, gy = grid[None, None, :], grid[None, :, None]
    sx, sy = gx - col(rng.uniform(-0.12, 0.12, n)), gy - col(rng.uniform(-0.12, 0.12, n))
    u = (np.cos(angle) * sx + np.sin(angle) * sy) / scale
    v = (-np.sin(angle) * sx + np.cos(angle) * sy) / scale
    edge = (2.0 / SIDE) / scale
    face = _soft_mask(np.hypot(u / 0.78, v / 0.95) - 1, edge / 0.8)
    ink = np.zeros_like(u)
    for side in (-1, 1):
        ink = np.maximum(ink, _soft_mask(np.hypot((u - side * 0.33) / 0.11, (v + 0.12) / np.maximum(eye, 0.02)) - 1,
                                         edge / 0.1))
        brow = _segment_dist(u, v, side * 0.33, -0.34 - raise_, -side * tilt, 0.15)
        ink = np.maximum(ink, _soft_mask(brow - 0.035, edge))
    ink = np.maximum(ink, _mouth(u, v, curve, opening, skew, edge))
    tone = col(rng.uniform(120, 230, n))
    image = col(rng.uniform(0, 100, n)) * (1 - face) + tone * face
    image = image * (1 - ink) + tone * col(rng.uniform(0.1, 0.45, n)) * ink
    image += rng.normal(0, 1, image.shape).astype(np.float32) * col(rng.uniform(2, 14, n))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _mouth(u: np.ndarray, v: np.ndarray, curve: np.ndarray, opening: np.ndarray, skew: np.ndarray,
           edge: np.ndarray) -> np.ndarray:
    """A curved band (smile > 0, frown < 0) that opens in the middle and may tilt to one side."""
    half_width = 0.32
    s = np.clip(u / half_width, -1, 1)
    centre = 0.45 - curve * (s ** 2 - 0.5) + skew * s * 0.3
    thickness = 0.03 + np.maximum(opening, 0) * (1 - s ** 2)
    inside_x = np.abs(u) - half_width
    dist = np.maximum(np.abs(v - centre) - thickness, inside_x)
    return _soft_mask(dist, edge)

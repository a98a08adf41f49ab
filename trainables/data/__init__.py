"""FER2013 data: load the Kaggle CSV or image folders (or FER+ labels, or demo faces) as uint8 tensors.

The protocol lives here: a split is parsed only when the caller names it, and the
search path asks for `SEARCH_SPLITS` (Training, PublicTest) only, so PrivateTest
pixels are never read (not even from the cache) until the final evaluation asks
for them. `load_fer2013` picks the reader by what `path` is:

- `splits`: the containers (`Split`, `FERData`), split and class names, subsets;
- `kaggle_csv`: fer2013.csv and its binary cache;
- `ferplus`: FER+ vote labels;
- `folders`: the image-folder release;
- `demo`: the procedurally drawn demo faces.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from trainables.data.demo import make_demo
from trainables.data.ferplus import apply_ferplus, attach_votes
from trainables.data.folders import load_folder
from trainables.data.kaggle_csv import load_csv
from trainables.data.splits import (
    EMOTIONS,
    FERPLUS_CLASSES,
    LABEL_SETS,
    SEARCH_SPLITS,
    SPLITS,
    FERData,
    Split,
    check_splits,
    class_counts,
    duplicate_mask,
    stratified_fraction,
)
from trainables.errors import UserError

__all__ = ["EMOTIONS", "FERPLUS_CLASSES", "LABEL_SETS", "SEARCH_SPLITS", "SPLITS", "FERData", "Split",
           "class_counts", "duplicate_mask", "load_fer2013", "make_demo", "stratified_fraction"]


def load_fer2013(path: str | os.PathLike, *, splits: Sequence[str] = SEARCH_SPLITS,
                 labels: str = "fer2013", ferplus_path: str | os.PathLike | None = None,
                 val_fraction: float = 0.1, seed: int = 0, cache: bool = True, votes: bool = False) -> FERData:
    """Load the requested FER2013 splits from "demo", a Kaggle `fer2013.csv`, or an image folder.

    Only the splits named in `splits` are parsed; the default is the search protocol's
    Training + PublicTest, so PrivateTest pixels are untouched unless asked for. A CSV
    (header `emotion,pixels,Usage`) is parsed once and cached as one `.npz` per split in
    `<file>.cache/` (or `~/.cache/fer-search/<sha1 of path>/` when that is not writable),
    keyed by the file's size and mtime. An image folder holds `train/<emotion>/*.png|jpg`,
    `test/<emotion>/*` and optionally `val/` or `validation/`: see `folders.load_folder`
    (file names that carry the split, as in Kaggle's release, decide it; otherwise the
    test split is named "test"); folder rows number the files in (emotion, natural file
    name) order. `labels="ferplus"` replaces the
    7 FER2013 labels by the 8 FER+ classes from `ferplus_path` (default `fer2013new.csv`
    beside the CSV), see `ferplus.apply_ferplus`. With `votes` and FER2013 labels from a CSV,
    every split also carries its FER+ vote counts (`Split.votes`, see `ferplus.attach_votes`)
    from `ferplus_path`, or from `fer2013new.csv` beside the CSV when that file is there (when it
    is not, or cannot be read, the splits carry none and a warning says why; a `ferplus_path`
    that is wrong is an error). Every data problem raises `UserError`.
    """
    names = check_splits(splits)
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
        loaded, test_name = load_folder(src, names, val_fraction, seed)
        return FERData(EMOTIONS, loaded, os.fspath(path), test_name=test_name)
    loaded, n_rows = load_csv(src, names, cache)
    if labels == "ferplus":
        votes_path = Path(ferplus_path) if ferplus_path else src.with_name("fer2013new.csv")
        return FERData(FERPLUS_CLASSES, apply_ferplus(loaded, n_rows, votes_path), os.fspath(path))
    if votes:
        loaded = with_votes(loaded, n_rows, src, ferplus_path)
    return FERData(EMOTIONS, loaded, os.fspath(path))


def with_votes(loaded: dict[str, Split], n_rows: int, src: Path,
               ferplus_path: str | os.PathLike | None) -> dict[str, Split]:
    """`loaded` with FER+ votes attached, when there are votes to attach (see `load_fer2013`)."""
    if ferplus_path:
        return attach_votes(loaded, n_rows, Path(ferplus_path))
    beside = src.with_name("fer2013new.csv")
    if not beside.is_file():
        return loaded
    try:
        return attach_votes(loaded, n_rows, beside)
    except UserError as e:  # a file the user did not name must not stop a FER2013 run
        print(f"warning: FER+ votes not used ({e})", file=sys.stderr, flush=True)
        return loaded


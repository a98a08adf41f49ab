"""Kaggle's image-folder release: `train/<emotion>/*.png|jpg`, `test/<emotion>/*`, optional `val/`."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from trainables.data.splits import EMOTIONS, SIDE, Split, stratified_indices
from trainables.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# Kaggle's image-folder release keeps FER2013's split only in its file names.
SPLIT_PREFIXES = {"training_": "Training", "publictest_": "PublicTest", "privatetest_": "PrivateTest"}
UNNAMED_TEST = "test"


def load_folder(root: Path, splits: tuple[str, ...], val_fraction: float, seed: int) -> tuple[dict[str, Split], str]:
    """Load splits from `train/`, `val/`|`validation/` and `test/`; returns them and the test split's name.

    When the file names under `test/` carry FER2013's split (`PublicTest_<id>.jpg`,
    `PrivateTest_<id>.jpg`, any case: Kaggle's image release), PublicTest and PrivateTest are
    those files, exactly as with the CSV, and Training is `train/`. Otherwise Training is
    `train/`, PublicTest `val/` (or a seeded, stratified `val_fraction` slice of `train/`) and
    the test split is `test/`, named "test" in every output: nothing says it is PrivateTest.
    """
    sub = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    test_dir = sub.get("test")
    named = _named_splits(test_dir) if test_dir is not None else None
    if named is not None:
        plan = _plan_named(sub, root, splits, named)
        test_name = "PrivateTest"
    else:
        plan = _plan_unnamed(sub, root, splits, val_fraction, seed)
        test_name = UNNAMED_TEST
        if "PrivateTest" in splits:
            print(f"note: the file names under {test_dir} do not say which FER2013 split they hold; "
                  f"it is scored as '{UNNAMED_TEST}', not as PrivateTest", file=sys.stderr)
    out = {}
    for name in splits:
        files, labels, rows = plan[name]
        if not files:
            raise UserError(f"split {name} has no rows in {root} (no images found)")
        x = np.stack([_read_image(f) for f in files])
        out[name] = Split(torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64)),
                          torch.from_numpy(np.asarray(rows, dtype=np.int64)))
    return out, test_name


def _named_splits(test_dir: Path) -> np.ndarray | None:
    """The split of each file of `test/` (in `_list_images` order) when every name carries one, else None."""
    files, _ = _list_images(test_dir)
    found = [next((split for prefix, split in SPLIT_PREFIXES.items() if f.name.lower().startswith(prefix)), None)
             for f in files]
    if not files or all(split is None for split in found):
        return None
    if any(split is None for split in found):
        bad = files[found.index(None)]
        raise UserError(f"{bad}: some files under {test_dir} name their split (PublicTest_..., PrivateTest_...) "
                        f"and this one does not; rename or remove it")
    return np.array(found)


def _plan_named(sub: dict[str, Path], root: Path, splits: tuple[str, ...], named: np.ndarray) -> dict:
    """Training from train/, PublicTest and PrivateTest from test/ by file name (rows: the test/ order)."""
    plan = {}
    if "Training" in splits:
        files, labels = _list_images(_need_dir(sub, "train", root))
        plan["Training"] = (files, labels, np.arange(len(files)))
    if {"PublicTest", "PrivateTest"} & set(splits):  # names only; pixels are read for the splits asked for
        files, labels = _list_images(sub["test"])
        for split in ("PublicTest", "PrivateTest"):
            idx = np.flatnonzero(named == split)
            plan[split] = ([files[i] for i in idx], labels[idx], idx)
    return plan


def _plan_unnamed(sub: dict[str, Path], root: Path, splits: tuple[str, ...], val_fraction: float,
                  seed: int) -> dict:
    """train/, val/ (or a slice of train/) and test/, as they are."""
    val_dir = sub.get("val") or sub.get("validation")
    plan: dict[str, tuple[list[Path], np.ndarray, np.ndarray]] = {}   # files, labels, rows
    if "Training" in splits or ("PublicTest" in splits and val_dir is None):
        files, labels = _list_images(_need_dir(sub, "train", root))
        if val_dir is None:
            if not 0 < val_fraction < 1:
                raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
            val_idx = stratified_indices(labels, val_fraction, np.random.default_rng(seed), for_val=True)
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
    return plan


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


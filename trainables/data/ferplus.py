"""FER+ labels: Microsoft's `fer2013new.csv` votes, joined to fer2013.csv by row position.

Two uses: `apply_ferplus` replaces the 7 FER2013 labels by the 8 FER+ classes (`--labels ferplus`);
`attach_votes` keeps the FER2013 labels and carries each image's 10 raw vote counts beside them
(`Split.votes`), which the label audit (`search.final_stage.labels`) and the FER+ vote targets
(`vote_targets`, the `ferplus_votes` hyperparameter) read.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from trainables.data.splits import FERPLUS_CLASSES, Split
from trainables.errors import UserError

FERPLUS_COLUMNS = ("Usage", "Image name", *FERPLUS_CLASSES, "unknown", "NF")
VOTE_COLUMNS = FERPLUS_COLUMNS[2:]   # the 10 vote columns, in the file's order
# For each FER2013 emotion (EMOTIONS order: angry, disgust, fear, happy, sad, surprise, neutral), its FER+ column.
# Contempt has no FER2013 counterpart; unknown and NF (not a face) are not emotions.
FER2013_COLUMNS = tuple(FERPLUS_CLASSES.index(c) for c in
                        ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"))
# Why a FER+ majority is left out of the 7 shared emotions (`majority7`), in the order they are counted.
LEFT_OUT = ("contempt", "unknown", "not_face", "no_majority")


def _counted(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Microsoft's counting rule: votes of 1 dropped as outliers. Returns the votes left (N, 10), each row's top
    column, and whether that column holds more than half of the votes left (a clear majority)."""
    v = np.where(votes > 1, votes, 0)
    return v, v.argmax(axis=1), v.max(axis=1) > 0.5 * v.sum(axis=1)


def majority_labels(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Microsoft's FER+ reference rule (FERPlus repository, mode `majority`) over the 10 vote columns.

    Votes of 1 are dropped as outliers; an image is kept only when its top column has more
    than half of the remaining votes and that column is one of the 8 emotions (a top
    `unknown` or `NF`, not a face, drops it, as does no clear majority). Returns the keep
    mask (N,), the hard labels of the kept rows, and their soft labels: the 8 emotions'
    remaining votes normalised to sum 1.
    """
    v, top, clear = _counted(votes)
    keep = clear & (top < len(FERPLUS_CLASSES))
    emo = v[keep, :len(FERPLUS_CLASSES)].astype(np.float64)
    return keep, top[keep].astype(np.int64), (emo / emo.sum(axis=1, keepdims=True)).astype(np.float32)


def majority7(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The FER+ majority (`majority_labels`' rule) as a FER2013 emotion index, -1 where there is none.

    Returns the labels (N,) and, per row, "" for a kept row or the reason it is left out: its
    majority is `contempt` (no FER2013 counterpart), `unknown` or `not_face`, or no column has more
    than half of the votes left after dropping single votes (`no_majority`).
    """
    _, top, clear = _counted(votes)
    to7 = np.full(len(VOTE_COLUMNS), -1)
    to7[list(FER2013_COLUMNS)] = np.arange(len(FER2013_COLUMNS))
    labels = np.where(clear, to7[top], -1).astype(np.int64)
    named = np.array(["", "contempt", "unknown", "not_face"])[np.select(
        [top == FERPLUS_CLASSES.index("contempt"), top == VOTE_COLUMNS.index("unknown"),
         top == VOTE_COLUMNS.index("NF")], [1, 2, 3], 0)]
    reasons = np.where(clear, named, "no_majority")
    return labels, reasons


def fold_votes(votes: np.ndarray) -> np.ndarray:
    """The FER+ vote distribution over the 7 FER2013 emotions: (N, 7) float32, rows summing to 1, or 0 where no
    vote is left.

    Single votes are dropped as outliers, as Microsoft's rule does; contempt, unknown and not-a-face
    votes are left out (no FER2013 emotion to give them to), and the rest renormalised.
    """
    v = _counted(votes)[0][:, list(FER2013_COLUMNS)].astype(np.float64)
    total = v.sum(axis=1, keepdims=True)
    return np.divide(v, total, out=np.zeros_like(v), where=total > 0).astype(np.float32)


def vote_targets(votes: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
    """Training targets (N, 7) float32: `weight` of the folded FER+ vote distribution (`fold_votes`), the rest the
    FER2013 label; an image with no vote left (all on contempt, unknown or not-a-face) keeps its label alone."""
    if not 0 <= weight <= 1:
        raise UserError(f"ferplus_votes must be in [0, 1], got {weight}")
    onehot = torch.nn.functional.one_hot(y.cpu(), len(FER2013_COLUMNS)).float()
    folded = torch.from_numpy(fold_votes(votes.cpu().numpy()))
    has = folded.sum(dim=1, keepdim=True) > 0
    return torch.where(has, weight * folded + (1 - weight) * onehot, onehot)


def attach_votes(splits: dict[str, Split], n_rows: int, votes_path: Path) -> dict[str, Split]:
    """`splits` with their FER2013 labels, each carrying its images' 10 FER+ vote counts (`Split.votes`, int16),
    joined by row position as `apply_ferplus` joins them."""
    usage, votes = _read_ferplus(votes_path, n_rows)
    out = {}
    for name, s in splits.items():
        rows = s.rows.numpy()
        _check_usage(usage, rows, name, votes_path)
        out[name] = dataclasses.replace(s, votes=torch.from_numpy(votes[rows].astype(np.int16)))
    return out


def _check_usage(usage: np.ndarray, rows: np.ndarray, name: str, votes_path: Path) -> None:
    disagree = np.flatnonzero(usage[rows] != name)
    if len(disagree):
        r = int(rows[disagree[0]])
        raise UserError(f"{votes_path}, line {r + 2}: Usage {usage[r]!r} but fer2013 row {r} is {name}; "
                        f"the FER+ file does not match this fer2013.csv")


def apply_ferplus(splits: dict[str, Split], n_rows: int, votes_path: Path) -> dict[str, Split]:
    """Relabel FER2013 splits with FER+ votes, joined by row position, under `majority_labels`.

    The `Image name` column is ignored: names are not row indices and four of them repeat.
    On the real files the rule keeps 25,060 / 3,199 / 3,153 images of Training /
    PublicTest / PrivateTest, the counts published FER+ accuracies are measured on.
    """
    usage, votes = _read_ferplus(votes_path, n_rows)
    out = {}
    for name, s in splits.items():
        rows = s.rows.numpy()
        _check_usage(usage, rows, name, votes_path)
        keep, labels, soft = majority_labels(votes[rows])
        if not keep.any():
            raise UserError(f"split {name} has no image with a FER+ majority emotion in {votes_path}")
        kept = s.subset(torch.from_numpy(np.flatnonzero(keep)))
        out[name] = Split(kept.x, torch.from_numpy(labels), kept.rows, torch.from_numpy(soft))
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


"""FER+ labels: Microsoft's `fer2013new.csv` votes, joined to fer2013.csv by row position."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from trainables.data.splits import FERPLUS_CLASSES, Split
from trainables.errors import UserError

FERPLUS_COLUMNS = ("Usage", "Image name", *FERPLUS_CLASSES, "unknown", "NF")


def apply_ferplus(splits: dict[str, Split], n_rows: int, votes_path: Path) -> dict[str, Split]:
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


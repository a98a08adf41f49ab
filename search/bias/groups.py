"""Per-group bias report: accuracy and macro recall per group of user-supplied attributes, with bootstrap intervals.

FER2013 carries no demographic labels, but a user may have some for their own images
(gender, age band, ...). A groups file is a CSV keyed by image, by `row` (the 0-based
data row of the source CSV, what `Split.rows` holds; for an image folder, the file's
position in its folder's listing) or by `file` (an image of a Kaggle-style folder, by its
path relative to the data root or by its bare name when that is unique). Every other
column is one attribute whose values name groups; a blank value leaves the image out of
that attribute only. `search.evaluate --groups` reads the file, keeps the evaluated
split's images it labels, and writes one table and one figure: per attribute, per group,
support, accuracy and macro recall with bootstrap 95% percentile intervals, and the
worst-to-best gap between groups with its own interval. No Ray here: numpy, pandas,
scikit-learn and matplotlib only.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import recall_score

from trainables.data.folders import _list_images, _named_splits
from trainables.errors import UserError, first_line
from trainables.files import atomic_path, write_csv

KEY_COLUMNS = ("row", "file")
MIN_SUPPORT = 2          # a group smaller than this is reported but left out of the gap
N_BOOTSTRAP = 1000
CONFIDENCE = 0.95
GROUP_COLUMNS = ["attribute", "group", "kind", "support", "accuracy", "accuracy_lo", "accuracy_hi",
                 "macro_recall", "macro_recall_lo", "macro_recall_hi", "in_gap",
                 "accuracy_worst", "accuracy_best", "macro_recall_worst", "macro_recall_best"]
# Bootstrap index matrices are drawn this many entries at a time (32 MB of int64): a large group
# (all of Training) is resampled in slices of replicates rather than in one (n_boot, n) block.
_CHUNK = 4_000_000


# --------------------------------------------------------------------------- the groups file

@dataclass(frozen=True)
class GroupLabels:
    """A parsed groups file: its key column, one key per labelled image, and the attribute values.

    `keys` holds ints for a `row` file and normalised relative paths or names for a `file`
    file; `values` has one column per attribute, aligned with `keys`, with "" where an
    image is not labelled for that attribute.
    """

    source: str
    key: str
    keys: list
    values: pd.DataFrame


def read_groups(path: str | os.PathLike) -> GroupLabels:
    """Read and check a groups file; every problem with it is a `UserError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"groups file {path} does not exist; pass a CSV with a 'row' or 'file' column and one "
                        f"column per attribute")
    try:
        # Everything as text (a group named "NA" or "01" stays itself); blank lines are kept so a
        # row's position gives its line number, then dropped. index_col=False: the key is a column in every
        # row, so a line with more fields than the header is an error, not a silent index (or a warning).
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            raw = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False, index_col=False)
    except pd.errors.ParserWarning:
        raise UserError(f"cannot read groups file {path} as CSV (a line has more fields than the header)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"cannot read groups file {path} as CSV ({first_line(err)})") from None
    raw = raw.apply(lambda col: col.str.strip())
    raw.columns = [str(c).strip() for c in raw.columns]
    # A trailing comma makes a nameless, empty column: not an attribute.
    raw = raw[[c for c in raw.columns if not (c.startswith("Unnamed: ") and (raw[c] == "").all())]]
    keys = [c for c in raw.columns if c.lower() in KEY_COLUMNS]
    if len(keys) != 1:
        found = "both 'row' and 'file'" if keys else f"columns {list(raw.columns)[:8]}"
        raise UserError(f"groups file {path} needs exactly one key column, 'row' (data row of the source CSV) or "
                        f"'file' (image file name); it has {found}")
    key_col = keys[0]
    attributes = [c for c in raw.columns if c != key_col]
    if not attributes:
        raise UserError(f"groups file {path} has no attribute column; add one column per attribute "
                        f"(e.g. gender, age_band) beside '{key_col}'")
    raw.index = raw.index + 2   # CSV line numbers: the header is line 1
    raw = raw[(raw != "").any(axis=1)]
    kind = key_col.lower()
    parsed = [_parse_key(kind, text, line, path) for line, text in raw[key_col].items()]
    _refuse_duplicates(parsed, raw.index, kind, path)
    values = raw[attributes].reset_index(drop=True)
    return GroupLabels(str(path), kind, parsed, values)


def _parse_key(kind: str, text: str, line: int, path: Path) -> int | str:
    """One key: a non-negative integer row, or a file path normalised to forward slashes."""
    if not text:
        raise UserError(f"{path}, line {line}: the {kind} key is blank")
    if kind == "row":
        if not re.fullmatch(r"\+?\d{1,18}", text):   # 18 digits: any row fits int64
            raise UserError(f"{path}, line {line}: row '{text}' is not a non-negative integer (0-based data row)")
        return int(text)
    return PurePosixPath(text.replace("\\", "/")).as_posix()


def _refuse_duplicates(keys: Sequence, lines: Sequence[int], kind: str, path: Path) -> None:
    """A key given twice could carry two different labels: refuse it, naming both lines."""
    first: dict = {}
    for key, line in zip(keys, lines):
        if key in first:
            raise UserError(f"{path}: {kind} {key!r} appears twice (lines {first[key]} and {line}); "
                            f"keep one line per image")
        first[key] = line


# --------------------------------------------------------------------------- keys to the split's images

def split_folder(root: Path, split: str) -> Path:
    """The folder whose listing numbers `split`'s rows, following `folders.load_folder`'s plan.

    Training is `train/`, PrivateTest (or an unnamed "test") is `test/`; PublicTest is `test/`
    when its file names carry the split (Kaggle's release), else `val/`|`validation/`, else
    the slice of `train/` it was drawn from.
    """
    sub = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    test = sub.get("test")
    if split == "PublicTest" and test is not None and _named_splits(test) is not None:
        return test
    name = {"Training": "train", "PrivateTest": "test"}.get(split)
    if name is None:
        name = "val" if "val" in sub else "validation" if "validation" in sub else "train"
    if name not in sub:
        raise UserError(f"{root} has no {name}/ folder to match the groups file's file names against")
    return sub[name]


def file_rows(keys: Sequence[str], root: Path, split: str, source: str) -> np.ndarray:
    """The row of each file key in `split`'s folder listing (-1 where it names no file there).

    A key is a path relative to the data root (`test/happy/PrivateTest_1.jpg`), an absolute
    path under it, or a bare file name (`PrivateTest_1.jpg`) when only one file of the
    folder has it.
    """
    folder = split_folder(root, split)
    files, _ = _list_images(folder)   # the same listing, hence the same order, as the loader's rows
    by_path = {f.relative_to(root).as_posix(): i for i, f in enumerate(files)}
    by_name: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        by_name.setdefault(f.name, []).append(i)
    rows = np.full(len(keys), -1, dtype=np.int64)
    for k, key in enumerate(keys):
        if key.startswith("/"):   # an absolute path: the same file, relative to the data root
            inside = Path(key).resolve().is_relative_to(root.resolve())
            key = Path(key).resolve().relative_to(root.resolve()).as_posix() if inside else ""
        if "/" in key or not key:
            rows[k] = by_path.get(key, -1)
            continue
        hits = by_name.get(key, [])
        if len(hits) > 1:
            shown = ", ".join(files[i].relative_to(root).as_posix() for i in hits[:2])
            raise UserError(f"{source}: file '{key}' names {len(hits)} images ({shown}); give its path relative "
                            f"to {root}")
        rows[k] = hits[0] if hits else -1
    return rows


def labels_for_split(labels: GroupLabels, split_rows: np.ndarray, *, data: str, split: str,
                     shown: str | None = None) -> pd.DataFrame:
    """The attribute values of each image of the split, in split order ("" where the file gives none).

    `split_rows` is the split's `Split.rows`; `data` is the `--data` argument (an image
    folder for `file` keys). Keys matching no image of the split are allowed (they may
    belong to another split), but a file that matches none of them is a `UserError`.
    """
    shown = shown or split
    if labels.key == "row":
        rows = np.asarray(labels.keys, dtype=np.int64)
    else:
        root = Path(data).expanduser()
        if data == "demo" or not root.is_dir():
            raise UserError(f"groups file {labels.source} is keyed by 'file', which needs an image-folder --data; "
                            f"{data} has no image files, so key it by 'row' (0-based data row)")
        rows = file_rows([str(k) for k in labels.keys], root, split, labels.source)
        matched = rows[rows >= 0]
        if len(np.unique(matched)) < len(matched):
            raise UserError(f"groups file {labels.source} names one image twice (by path and by bare name); "
                            f"keep one line per image")
    position = pd.Series(np.arange(len(split_rows)), index=np.asarray(split_rows, dtype=np.int64))
    where = position.reindex(rows).to_numpy()   # NaN: the key is not an image of this split
    hit = ~np.isnan(where)
    if not hit.any():
        raise UserError(f"no key of groups file {labels.source} matches an image of {shown} in {data} "
                        f"({len(labels.keys)} {labels.key} keys, {len(split_rows)} images); check the key column "
                        f"and --split")
    out = pd.DataFrame("", index=range(len(split_rows)), columns=labels.values.columns, dtype=object)
    out.iloc[where[hit].astype(np.int64)] = labels.values.to_numpy()[hit]
    if not (out != "").to_numpy().any():
        raise UserError(f"groups file {labels.source}: the {int(hit.sum())} {shown} images it lists have no group "
                        f"label (every attribute value is blank)")
    return out


# --------------------------------------------------------------------------- metrics and bootstrap
# The bootstrap is drawn here rather than with scipy.stats.bootstrap: one set of replicates per
# group serves both metrics and, replicate by replicate, the gap between groups (max minus min
# over groups resampled independently), so the group intervals and the gap interval come from
# the same draws; scipy's would redraw per statistic and per call.

def macro_recall(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in `y_true` (absent classes would be 0/0, not a score)."""
    present = np.unique(y_true)
    return float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0))


def _macro_recall_rows(y: np.ndarray, correct: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro recall of each row of (B, n) label and correctness arrays, over the classes present in that row.

    One bincount over (row, class) codes gives every row's per-class totals and hits at once,
    so a thousand replicates cost a few array passes, not a thousand sklearn calls.
    """
    b = len(y)
    code = (np.arange(b)[:, None] * n_classes + y).ravel()
    total = np.bincount(code, minlength=b * n_classes).reshape(b, n_classes)
    hits = np.bincount(code, weights=correct.ravel(), minlength=b * n_classes).reshape(b, n_classes)
    present = total > 0
    recall = np.divide(hits, total, out=np.zeros(hits.shape), where=present)
    return recall.sum(1) / present.sum(1)


def bootstrap_group(y_true: np.ndarray, y_pred: np.ndarray, *, n_boot: int, rng: np.random.Generator,
                    n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro recall of `n_boot` resamples (with replacement, same size) of one group's images."""
    n = len(y_true)
    correct = (y_true == y_pred).astype(np.float64)
    acc, rec = np.empty(n_boot), np.empty(n_boot)
    step = max(1, _CHUNK // max(n, 1))
    for start in range(0, n_boot, step):   # slices of replicates; each slice is one vectorised draw
        b = min(step, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        acc[start:start + b] = correct[idx].mean(1)
        rec[start:start + b] = _macro_recall_rows(y_true[idx], correct[idx], n_classes)
    return acc, rec


def _interval(reps: np.ndarray) -> tuple[float, float]:
    """The percentile interval holding `CONFIDENCE` of the replicates."""
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(reps, [tail, 100 - tail])
    return float(lo), float(hi)


def group_report(y_true: Sequence[int], y_pred: Sequence[int], groups: pd.DataFrame | Mapping[str, Sequence[str]],
                 *, n_boot: int = N_BOOTSTRAP, seed: int = 0, min_support: int = MIN_SUPPORT) -> pd.DataFrame:
    """Per attribute: one "group" row per group and one "gap" row (columns `GROUP_COLUMNS`).

    `groups` holds one column per attribute, aligned with the labels, "" (or missing) where
    an image is not labelled for it. A group row gives support, accuracy and macro recall
    with bootstrap percentile intervals (images resampled within the group). The gap row
    gives best minus worst group (by point estimate, among groups with at least
    `min_support` images, `in_gap`), each metric with its own worst and best group, and an
    interval from the same replicates: every group is resampled independently and the
    replicate's gap is its max minus its min. Each attribute draws from a fresh generator
    seeded `seed`, so its numbers do not depend on the other columns.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if n_boot < 1:
        raise UserError(f"--bootstrap must be at least 1 replicate, got {n_boot}")
    groups = pd.DataFrame(groups)
    n_classes = int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1
    rows: list[dict] = []
    for attribute in groups.columns:
        rng = np.random.default_rng(seed)
        values = groups[attribute].fillna("").astype(str).to_numpy()
        names = sorted(set(values) - {""})
        reps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        attr_rows = []
        for name in names:
            mask = values == name
            yt, yp = y_true[mask], y_pred[mask]
            acc_reps, rec_reps = bootstrap_group(yt, yp, n_boot=n_boot, rng=rng, n_classes=n_classes)
            in_gap = bool(mask.sum() >= min_support)
            if in_gap:
                reps[name] = acc_reps, rec_reps
            attr_rows.append({"attribute": attribute, "group": name, "kind": "group", "support": int(mask.sum()),
                              **_point_and_interval("accuracy", float((yt == yp).mean()), acc_reps),
                              **_point_and_interval("macro_recall", macro_recall(yt, yp), rec_reps),
                              "in_gap": in_gap})
        rows += attr_rows + [_gap_row(attribute, attr_rows, reps)]
    return pd.DataFrame(rows, columns=GROUP_COLUMNS)


def _point_and_interval(metric: str, point: float, reps: np.ndarray) -> dict[str, float]:
    lo, hi = _interval(reps)
    return {metric: point, f"{metric}_lo": lo, f"{metric}_hi": hi}


def _gap_row(attribute: str, group_rows: list[dict], reps: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Best minus worst group of one attribute, per metric; NaN when fewer than two groups qualify."""
    row: dict = {"attribute": attribute, "group": "", "kind": "gap",
                 "support": sum(r["support"] for r in group_rows if r["in_gap"])}
    eligible = [r for r in group_rows if r["in_gap"]]
    for k, metric in enumerate(("accuracy", "macro_recall")):
        if len(eligible) < 2:
            row.update({metric: np.nan, f"{metric}_lo": np.nan, f"{metric}_hi": np.nan,
                        f"{metric}_worst": "", f"{metric}_best": ""})
            continue
        worst = min(eligible, key=lambda r: r[metric])
        best = max(eligible, key=lambda r: r[metric])
        stacked = np.stack([reps[r["group"]][k] for r in eligible])   # (groups, n_boot)
        row.update(_point_and_interval(metric, best[metric] - worst[metric], stacked.max(0) - stacked.min(0)))
        row.update({f"{metric}_worst": worst["group"], f"{metric}_best": best["group"]})
    return row


# --------------------------------------------------------------------------- outputs

def default_out_dir(weights: str | os.PathLike, sub: str = "groups") -> Path:
    """`results/<name>/final/<sub>/` for weights under `final/models/`, else the weights' own folder."""
    parent = Path(weights).parent
    if parent.name == "models" and parent.parent.name == "final":
        return parent.parent / sub
    return parent


def format_groups(table: pd.DataFrame) -> str:
    """The report as a fixed-width table (4 decimals, blanks for the cells a row kind does not use)."""
    shown = table.astype(object).where(table.notna(), "")
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def plot_groups(table: pd.DataFrame, path: str | os.PathLike, *, title: str = "") -> None:
    """One panel per attribute: accuracy and macro recall per group with their intervals, the gap in the title.

    Built on `Figure` directly (no pyplot), as `search.figures.plots` does, and written atomically.
    A group left out of the gap (too few images) is drawn hollow and starred in its tick label.
    """
    # Imported here, not at the top: `search.evaluate` without --groups never draws.
    from matplotlib.figure import Figure

    attributes = list(dict.fromkeys(table["attribute"]))
    widths = [max(3.0, 1.1 * int(((table["attribute"] == a) & (table["kind"] == "group")).sum()) + 1.5)
              for a in attributes]
    fig = Figure(figsize=(sum(widths), 4.2), layout="constrained")
    axes = fig.subplots(1, len(attributes), squeeze=False, width_ratios=widths)[0]
    for ax, attribute in zip(axes, attributes):
        part = table[table["attribute"] == attribute]
        groups, gap = part[part["kind"] == "group"], part[part["kind"] == "gap"].iloc[0]
        x = np.arange(len(groups))
        for offset, metric, colour in ((-0.12, "accuracy", "tab:blue"), (0.12, "macro_recall", "tab:orange")):
            point = groups[metric].to_numpy(float)
            err = np.vstack([point - groups[f"{metric}_lo"].to_numpy(float),
                             groups[f"{metric}_hi"].to_numpy(float) - point])
            for i, in_gap in enumerate(groups["in_gap"].astype(bool)):
                ax.errorbar(x[i] + offset, point[i], yerr=err[:, i:i + 1], fmt="o", color=colour, capsize=3,
                            markerfacecolor=colour if in_gap else "white",
                            label=metric.replace("_", " ") if i == 0 else None)
        ticks = [f"{g}{'' if ok else '*'}\nn={n}" for g, n, ok in
                 zip(groups["group"], groups["support"], groups["in_gap"].astype(bool))]
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{attribute}\n{_gap_text(gap, 'accuracy')}\n{_gap_text(gap, 'macro_recall')}", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    if (~table.loc[table["kind"] == "group", "in_gap"].astype(bool)).any():
        fig.supxlabel(f"* fewer than {MIN_SUPPORT} images: reported, left out of the gap", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _gap_text(gap: pd.Series, metric: str) -> str:
    name = metric.replace("_", " ")
    if pd.isna(gap[metric]):
        return f"{name} gap: fewer than 2 groups of {MIN_SUPPORT}+ images"
    return (f"{name} gap {gap[metric]:.3f} [{gap[f'{metric}_lo']:.3f}, {gap[f'{metric}_hi']:.3f}] "
            f"(worst {gap[f'{metric}_worst']}, best {gap[f'{metric}_best']})")


def write_group_report(table: pd.DataFrame, out_dir: str | os.PathLike, stem: str, *,
                       title: str = "") -> tuple[Path, Path]:
    """Write `<stem>-groups.csv` and `<stem>-groups.png` under `out_dir` (atomically); returns both paths."""
    out_dir = Path(out_dir)
    csv, png = out_dir / f"{stem}-groups.csv", out_dir / f"{stem}-groups.png"
    write_csv(table, csv)
    plot_groups(table, png, title=title)
    return csv, png

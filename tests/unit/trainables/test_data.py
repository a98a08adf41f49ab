"""Tests for trainables.data: CSV/folder/FER+/demo loading, validation, cache and the split protocol."""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import SHARED_FER
from trainables.data import (
    EMOTIONS,
    FERPLUS_CLASSES,
    SEARCH_SPLITS,
    SPLITS,
    FERData,
    Split,
    class_counts,
    duplicate_mask,
    kaggle_csv,
    load_fer2013,
    make_demo,
    stratified_fraction,
)
from trainables.data.ferplus import fold_votes, majority7, vote_targets
from trainables.device import to_device
from trainables.errors import UserError

HEADER = "emotion,pixels,Usage"
# (label, usage) of the small CSV; its data rows are 0..8, file lines 2..10.
SMALL_ROWS = [(0, "Training"), (3, "Training"), (6, "Training"), (3, "Training"), (1, "Training"),
              (4, "PublicTest"), (5, "PublicTest"), (2, "PrivateTest"), (6, "PrivateTest")]


def image(i: int) -> np.ndarray:
    """A distinct, deterministic 48x48 uint8 image per index (covers 0 and 255)."""
    img = np.random.default_rng(i).integers(0, 256, (48, 48), dtype=np.uint8)
    img[0, 0], img[0, 1] = 0, 255
    return img


def smooth(i: int) -> np.ndarray:
    """A smooth image for JPEG files, which are lossy (noise would not survive compression)."""
    return (np.add.outer(np.arange(48), np.arange(48)) * 2 + i).astype(np.uint8)


def pixel_text(img: np.ndarray) -> str:
    return " ".join(map(str, img.reshape(-1).tolist()))


def csv_lines(rows=SMALL_ROWS) -> list[str]:
    return [f"{y},{pixel_text(image(i))},{u}" for i, (y, u) in enumerate(rows)]


def write_csv(path: Path, lines: list[str], header: str = HEADER, eol: str = "\n") -> Path:
    path.write_bytes((eol.join([header, *lines]) + eol).encode())
    return path


@pytest.fixture
def small_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "fer2013.csv", csv_lines())


def check_split(split: Split, rows: list[int]) -> None:
    assert split.x.dtype == torch.uint8 and split.x.shape == (len(rows), 48, 48)
    assert split.y.dtype == torch.int64 and split.rows.dtype == torch.int64
    assert split.rows.tolist() == rows
    assert split.y.tolist() == [SMALL_ROWS[r][0] for r in rows]
    for x, r in zip(split.x, rows):
        assert np.array_equal(x.numpy(), image(r))


# --------------------------------------------------------------------------- CSV

def test_csv_round_trip_default_splits(small_csv: Path) -> None:
    d = load_fer2013(small_csv)
    assert isinstance(d, FERData) and d.classes == EMOTIONS and d.num_classes == 7
    assert list(d.splits) == list(SEARCH_SPLITS) and d.source == str(small_csv)
    check_split(d.train, [0, 1, 2, 3, 4])
    check_split(d.val, [5, 6])
    with pytest.raises(UserError, match=r"PrivateTest was not loaded .*loaded: Training, PublicTest"):
        d.test


def test_csv_all_splits_in_canonical_order(small_csv: Path) -> None:
    d = load_fer2013(small_csv, splits=["PrivateTest", "Training", "PublicTest"])
    assert list(d.splits) == list(SPLITS)
    check_split(d.test, [7, 8])
    only = load_fer2013(small_csv, splits=["PublicTest"])
    assert list(only.splits) == ["PublicTest"]
    with pytest.raises(UserError, match="Training was not loaded"):
        only.train


def test_csv_tolerates_crlf_bom_whitespace_and_blank_lines(tmp_path: Path) -> None:
    lines = csv_lines()
    lines = [lines[0], "", *[" " + line.replace(",", " , ") for line in lines[1:]], "", ""]
    path = write_csv(tmp_path / "f.csv", lines, header="\ufeff emotion , pixels , Usage ", eol="\r\n")
    d = load_fer2013(path, splits=SPLITS, cache=False)
    check_split(d.train, [0, 1, 2, 3, 4])
    check_split(d.test, [7, 8])


def test_blank_lines_do_not_shift_reported_line_numbers(tmp_path: Path) -> None:
    lines = csv_lines()
    lines[3] = lines[3].replace("Training", "Trainnig")
    path = write_csv(tmp_path / "f.csv", ["", *lines])   # data row 3 is now on file line 6
    with pytest.raises(UserError, match=r"line 6: Usage 'Trainnig'"):
        load_fer2013(path)


def test_unknown_split_or_labels_name_is_user_error(small_csv: Path) -> None:
    with pytest.raises(UserError, match="unknown split"):
        load_fer2013(small_csv, splits=["Test"])
    with pytest.raises(UserError, match="unknown labels"):
        load_fer2013(small_csv, labels="affectnet")


# --------------------------------------------------------------------------- bad data

def bad_pixel(text: str):
    """Replace pixel 100 of data row 2 (file line 4) by `text`."""
    def edit(lines: list[str]) -> list[str]:
        y, pix, u = lines[2].split(",")
        tokens = pix.split(" ")
        tokens[100] = text
        lines[2] = f"{y},{' '.join(tokens)},{u}"
        return lines
    return edit


def set_field(row: int, column: int, value: str):
    def edit(lines: list[str]) -> list[str]:
        fields = lines[row].split(",")
        fields[column] = value
        lines[row] = ",".join(fields)
        return lines
    return edit


def drop_pixel(lines: list[str]) -> list[str]:
    y, pix, u = lines[6].split(",")
    lines[6] = f"{y},{pix.rsplit(' ', 1)[0]},{u}"
    return lines


BAD_ROWS = {
    # name: (edit of the data lines, expected message part, line named)
    "2303 pixels": (drop_pixel, "2303 pixel values, expected 2304", 8),
    "2305 pixels": (bad_pixel("7 7"), "2305 pixel values", 4),
    "non-numeric pixel": (bad_pixel("abc"), "'abc' is not an integer", 4),
    "float pixel": (bad_pixel("1.5"), "'1.5' is not an integer", 4),
    "pixel 256": (bad_pixel("256"), "256 is outside 0..255", 4),
    "pixel -1": (bad_pixel("-1"), "-1 is outside 0..255", 4),
    "huge pixel": (bad_pixel("99999999999999999999999"), "is outside 0..255", 4),
    "label 7": (set_field(1, 0, "7"), "emotion '7' is not valid", 3),
    "label -1": (set_field(5, 0, "-1"), "emotion '-1' is not valid", 7),
    "label 3.0": (set_field(1, 0, "3.0"), "emotion '3.0'", 3),
    "label missing": (set_field(1, 0, ""), "emotion is missing", 3),
    "unknown Usage": (set_field(4, 2, "Test"), "Usage 'Test' is not valid", 6),
    "Usage missing": (set_field(4, 2, ""), "Usage is missing", 6),
    "pixels missing": (set_field(4, 1, ""), "0 pixel values", 6),
    "extra field first row": (lambda ls: [ls[0] + ",x", *ls[1:]], "line 2: expected 3 fields", 2),
    "extra field later row": (lambda ls: [*ls[:3], ls[3] + ",x", *ls[4:]], "expected 3 fields", 5),
    "too few fields": (lambda ls: [*ls[:3], ls[3].rsplit(",", 1)[0], *ls[4:]], "Usage is missing", 5),
    "not UTF-8": (set_field(4, 2, "Tr\udcffaining"), "not UTF-8", 6),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_names_file_and_line(tmp_path: Path, case: str) -> None:
    edit, message, line = BAD_ROWS[case]
    text = "\n".join([HEADER, *edit(csv_lines())]) + "\n"
    path = tmp_path / "bad.csv"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(UserError) as err:
        load_fer2013(path)
    assert str(path) in str(err.value) and f"line {line}" in str(err.value), str(err.value)
    assert message in str(err.value), str(err.value)


BAD_FILES = {
    "empty file": (b"", "is empty"),
    "whitespace only": (b"\n\n  \n", "is empty"),
    "binary garbage": (bytes(range(256)) * 40, "line 1: binary data"),
    "not UTF-8 header": (b"\xff\xfe\xfa,pixels,Usage\n", "line 1: not UTF-8"),
    "wrong header": (b"emotion,pixel,Usage\n0,1,Training\n", "line 1: header must be"),
    "missing header column": (b"emotion,pixels\n0,1\n", "line 1: header must be"),
    "extra header column": (b"emotion,pixels,Usage,extra\n", "line 1: header must be"),
    "no header": (csv_lines()[0].encode() + b"\n", "line 1: header must be"),
    "header only": (HEADER.encode() + b"\n", "split Training has no rows in"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_names_file(tmp_path: Path, case: str) -> None:
    content, message = BAD_FILES[case]
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_fer2013(path)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)


def test_requested_split_without_rows(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "f.csv", csv_lines([(0, "Training"), (1, "PrivateTest")]))
    with pytest.raises(UserError, match=rf"split PublicTest has no rows in {re.escape(str(path))}"):
        load_fer2013(path)
    assert len(load_fer2013(path, splits=["Training"]).train) == 1


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=rf"{re.escape(str(tmp_path / 'nope.csv'))} does not exist"):
        load_fer2013(tmp_path / "nope.csv")


# --------------------------------------------------------------------------- the PrivateTest guard

def corrupt_private_test(lines: list[str]) -> list[str]:
    """Break every PrivateTest row's pixels (labels and Usage stay valid)."""
    return [line.replace(line.split(",")[1], "not pixels") if line.endswith("PrivateTest") else line
            for line in lines]


@pytest.mark.parametrize("cache", [True, False])
def test_private_test_pixels_are_not_parsed_unless_requested(tmp_path: Path, cache: bool) -> None:
    path = write_csv(tmp_path / "f.csv", corrupt_private_test(csv_lines()))
    d = load_fer2013(path, cache=cache)
    check_split(d.train, [0, 1, 2, 3, 4])
    check_split(d.val, [5, 6])
    with pytest.raises(UserError, match=r"line 9: 2 pixel values"):
        load_fer2013(path, splits=SPLITS, cache=cache)


def test_labels_are_validated_in_every_row(tmp_path: Path) -> None:
    lines = csv_lines()
    lines[8] = lines[8].replace("6,", "9,", 1)   # a PrivateTest row
    with pytest.raises(UserError, match="line 10: emotion '9'"):
        load_fer2013(write_csv(tmp_path / "f.csv", lines))


# --------------------------------------------------------------------------- cache

def forbid_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the CSV was parsed again")
    monkeypatch.setattr(kaggle_csv, "_parse_csv", fail)


def test_cache_hit_skips_parsing_and_holds_one_file_per_split(small_csv, monkeypatch) -> None:
    first = load_fer2013(small_csv)
    cache_dir = small_csv.parent / "fer2013.csv.cache"
    assert sorted(p.name for p in cache_dir.iterdir()) == ["PublicTest.npz", "Training.npz", "meta.json"]
    forbid_parse(monkeypatch)
    second = load_fer2013(small_csv)
    for name in SEARCH_SPLITS:
        assert torch.equal(first.splits[name].x, second.splits[name].x)
        assert torch.equal(first.splits[name].rows, second.splits[name].rows)
    check_split(second.train, [0, 1, 2, 3, 4])


def test_cache_parses_only_the_missing_split(small_csv, monkeypatch) -> None:
    load_fer2013(small_csv)
    calls = []
    real = kaggle_csv._parse_csv
    monkeypatch.setattr(kaggle_csv, "_parse_csv", lambda path, splits: calls.append(splits) or real(path, splits))
    d = load_fer2013(small_csv, splits=SPLITS)
    assert calls == [("PrivateTest",)]
    check_split(d.test, [7, 8])
    load_fer2013(small_csv, splits=SPLITS)
    assert calls == [("PrivateTest",)]


def test_cache_is_invalidated_when_the_file_changes(small_csv) -> None:
    load_fer2013(small_csv)
    lines = csv_lines()
    lines[0] = lines[0].replace("0,", "5,", 1)
    write_csv(small_csv, lines)
    st = small_csv.stat()
    os.utime(small_csv, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse mtime clocks
    assert load_fer2013(small_csv).train.y[0].item() == 5


def test_cache_false_writes_nothing(small_csv) -> None:
    load_fer2013(small_csv, cache=False)
    assert not (small_csv.parent / "fer2013.csv.cache").exists()


def test_cache_falls_back_to_home_when_beside_is_not_writable(small_csv, tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # A directory below a regular file cannot be created, even by root (chmod would not stop root).
    monkeypatch.setattr(kaggle_csv, "_local_cache_dir", lambda path: blocker / "x.cache")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    load_fer2013(small_csv)
    homes = list((tmp_path / "home" / ".cache" / "fer-search").iterdir())
    assert len(homes) == 1 and (homes[0] / "Training.npz").is_file()
    forbid_parse(monkeypatch)
    check_split(load_fer2013(small_csv).train, [0, 1, 2, 3, 4])


def test_damaged_cache_file_is_reparsed(small_csv) -> None:
    load_fer2013(small_csv)
    (small_csv.parent / "fer2013.csv.cache" / "Training.npz").write_bytes(b"garbage")
    check_split(load_fer2013(small_csv).train, [0, 1, 2, 3, 4])


# --------------------------------------------------------------------------- image folders

def save(path: Path, img: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).convert(mode).save(path)


def make_folder(root: Path, per_class: int = 10, val: str | None = None, test: bool = True) -> Path:
    """train/ with three classes in odd cases, .png and .jpg files; optional val/ and test/."""
    k = 0
    for folder, label in [("Angry", 0), ("HAPPY", 3), ("sad", 4)]:
        for j in range(per_class):
            jpg = label == 3 and j % 2 == 1
            save(root / "train" / folder / (f"{j}.jpg" if jpg else f"{j}.png"),
                 smooth(k) if jpg else image(1000 + k))
            k += 1
        if val:
            save(root / val / folder / "a.png", image(2000 + label))
        if test:
            save(root / "test" / folder / "b.png", image(3000 + label), mode="RGB")
    return root


def test_folder_without_val_takes_stratified_slice(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs")
    d = load_fer2013(root, val_fraction=0.2, seed=1)
    assert d.classes == EMOTIONS and list(d.splits) == list(SEARCH_SPLITS)
    assert class_counts(d.val, 7).tolist() == [2, 0, 0, 2, 2, 0, 0]
    assert class_counts(d.train, 7).tolist() == [8, 0, 0, 8, 8, 0, 0]
    train_rows, val_rows = set(d.train.rows.tolist()), set(d.val.rows.tolist())
    assert not train_rows & val_rows and train_rows | val_rows == set(range(30))
    # rows number the train/ files in (emotion, natural name) order, so row 0 is Angry/0.png
    i = d.train.rows.tolist().index(0) if 0 in train_rows else None
    j = d.val.rows.tolist().index(0) if 0 in val_rows else None
    first = d.train.x[i] if i is not None else d.val.x[j]
    assert np.array_equal(first.numpy(), image(1000))
    again = load_fer2013(root, val_fraction=0.2, seed=1)
    other = load_fer2013(root, val_fraction=0.2, seed=2)
    assert torch.equal(again.val.rows, d.val.rows) and not torch.equal(other.val.rows, d.val.rows)


def test_folder_natural_order_and_jpg(tmp_path: Path) -> None:
    for name in ["10.png", "2.png"]:
        save(tmp_path / "train" / "neutral" / name, image(int(name.split(".")[0])))
    save(tmp_path / "train" / "neutral" / "1.jpeg", smooth(1))
    save(tmp_path / "val" / "Neutral" / "x.JPG", smooth(5))
    d = load_fer2013(tmp_path)
    assert d.train.rows.tolist() == [0, 1, 2] and d.train.y.tolist() == [6, 6, 6]
    assert np.abs(d.train.x[0].numpy().astype(int) - smooth(1)).max() <= 8   # 1.jpeg, lossy
    assert np.array_equal(d.train.x[1].numpy(), image(2)) and np.array_equal(d.train.x[2].numpy(), image(10))
    assert np.abs(d.val.x[0].numpy().astype(int) - smooth(5)).max() <= 8


@pytest.mark.parametrize("val_name", ["val", "Validation"])
def test_folder_with_val_dir(tmp_path: Path, val_name: str) -> None:
    root = make_folder(tmp_path, per_class=3, val=val_name)
    d = load_fer2013(root, splits=SPLITS)
    assert len(d.train) == 9 and d.train.rows.tolist() == list(range(9))
    assert d.val.y.tolist() == [0, 3, 4] and np.array_equal(d.val.x[1].numpy(), image(2003))
    assert np.array_equal(d.test.x[2].numpy(), image(3004))   # RGB file, converted to L


def _kaggle_release(root: Path) -> Path:
    """Kaggle's image release: the split lives in the file names, test/ holds both test splits."""
    for label, emo in [(0, "angry"), (3, "happy")]:
        for j in range(3):
            save(root / "train" / emo / f"Training_{100 * label + j}.jpg", smooth(label * 10 + j))
        save(root / "test" / emo / f"PublicTest_{500 + label}.png", image(5000 + label))
        save(root / "test" / emo / f"privatetest_{700 + label}.png", image(7000 + label))  # any case
    return root


def test_folder_with_split_in_file_names(tmp_path: Path, capsys) -> None:
    root = _kaggle_release(tmp_path / "k")
    d = load_fer2013(root, splits=SPLITS)
    assert d.test_name == "PrivateTest" and len(d.train) == 6
    assert np.array_equal(d.val.x.numpy(), np.stack([image(5000), image(5003)]))
    assert np.array_equal(d.test.x.numpy(), np.stack([image(7000), image(7003)]))
    assert d.val.y.tolist() == [0, 3] and d.test.y.tolist() == [0, 3]
    assert "note:" not in capsys.readouterr().err
    # The search's load reads no PrivateTest pixels: a broken PrivateTest file is not noticed.
    (root / "test" / "angry" / "privatetest_700.png").write_bytes(b"broken")
    assert len(load_fer2013(root).val) == 2
    with pytest.raises(UserError, match="privatetest_700.png: not a readable image"):
        load_fer2013(root, splits=SPLITS)


def test_folder_without_split_names_calls_its_test_split_test(tmp_path: Path, capsys) -> None:
    d = load_fer2013(make_folder(tmp_path, per_class=3, val="val"), splits=SPLITS)
    assert d.test_name == "test" and len(d.test) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note:") and "not as PrivateTest" in err[0]
    mixed = _kaggle_release(tmp_path / "m")
    save(mixed / "test" / "happy" / "extra.png", image(9))
    with pytest.raises(UserError, match="extra.png: some files under .* name their split"):
        load_fer2013(mixed)


def test_folder_test_dir_untouched_unless_requested(tmp_path: Path) -> None:
    root = make_folder(tmp_path, per_class=3)
    bad = root / "test" / "sad" / "broken.png"
    bad.write_bytes(b"not a png")
    assert len(load_fer2013(root).train) + len(load_fer2013(root).val) == 9
    with pytest.raises(UserError, match=rf"{re.escape(str(bad))}: not a readable image"):
        load_fer2013(root, splits=SPLITS)


@pytest.mark.parametrize("case", ["unknown emotion", "not an image", "broken image", "wrong size", "no train"])
def test_folder_errors_name_the_file(tmp_path: Path, case: str) -> None:
    root = make_folder(tmp_path / "d", per_class=3, test=False)
    culprit = {
        "unknown emotion": root / "train" / "confused",
        "not an image": root / "train" / "sad" / "notes.txt",
        "broken image": root / "train" / "sad" / "x.png",
        "wrong size": root / "train" / "sad" / "big.png",
        "no train": root / "train",
    }[case]
    if case == "unknown emotion":
        save(culprit / "a.png", image(0))
    elif case == "wrong size":
        save(culprit, np.zeros((40, 50), np.uint8))
    elif case == "no train":
        culprit.rename(root / "training")
        culprit = root
    else:
        culprit.write_bytes(b"hello")
    with pytest.raises(UserError) as err:
        load_fer2013(root)
    assert str(culprit) in str(err.value), str(err.value)
    if case == "wrong size":
        assert "50x40" in str(err.value)


def test_folder_rejects_ferplus(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="need fer2013.csv"):
        load_fer2013(make_folder(tmp_path, per_class=2), labels="ferplus")


# --------------------------------------------------------------------------- demo

def test_demo_is_deterministic_balanced_and_distinct() -> None:
    a, b = make_demo(splits=SPLITS), make_demo(splits=SPLITS)
    assert a.source == "demo" and a.classes == EMOTIONS
    for name in SPLITS:
        assert torch.equal(a.splits[name].x, b.splits[name].x)
        assert torch.equal(a.splits[name].y, b.splits[name].y)
        assert a.splits[name].rows.tolist() == list(range(len(a.splits[name])))
    assert [len(a.train), len(a.val), len(a.test)] == [1400, 350, 350]
    counts = class_counts(a.train, 7)
    others = counts[[0, 2, 3, 4, 5, 6]]
    assert others.max() - others.min() <= 1 and 0.3 < counts[1] / others.min() < 0.5
    assert not duplicate_mask(a.val, a.train).any() and not duplicate_mask(a.test, a.train).any()
    assert not torch.equal(make_demo(seed=1).train.x, a.train.x)
    assert a.train.x.float().std() > 20   # not blank images


def test_demo_split_independent_of_other_splits_and_via_loader() -> None:
    full = make_demo(splits=SPLITS)
    via = load_fer2013("demo")
    assert list(via.splits) == list(SEARCH_SPLITS) and torch.equal(via.train.x, full.train.x)
    assert torch.equal(make_demo(splits=["PublicTest"]).val.x, full.val.x)
    with pytest.raises(UserError, match="FER\\+ labels need the real fer2013.csv"):
        load_fer2013("demo", labels="ferplus")
    with pytest.raises(UserError, match="at least 7"):
        make_demo(n_train=3)


def test_demo_classes_differ_in_shape() -> None:
    """A nearest-class-mean classifier on centred crops beats chance: the label is in the pixels."""
    d = make_demo(splits=SPLITS)
    feats = lambda s: (s.x[:, 8:40, 8:40].float() / 255).reshape(len(s), -1)  # noqa: E731
    tx, vx = feats(d.train), feats(d.val)
    tx, vx = tx - tx.mean(1, keepdim=True), vx - vx.mean(1, keepdim=True)
    means = torch.stack([tx[d.train.y == c].mean(0) for c in range(7)])
    acc = (torch.cdist(vx, means).argmin(1) == d.val.y).float().mean().item()
    assert acc > 0.25, acc   # chance is ~0.15; a ConvNet does far better, but that is too slow here


# --------------------------------------------------------------------------- helpers

def toy_split(labels: list[int]) -> Split:
    n = len(labels)
    x = torch.stack([torch.from_numpy(image(i)) for i in range(n)])
    return Split(x, torch.tensor(labels), torch.arange(n), torch.full((n, 7), 1 / 7))


def test_stratified_fraction() -> None:
    s = toy_split([0] * 40 + [1] * 20 + [2] * 1)
    sub = stratified_fraction(s, 0.25, seed=0)
    assert class_counts(sub, 3).tolist() == [10, 5, 1]
    assert sub.rows.tolist() == sorted(sub.rows.tolist()) and sub.soft.shape == (16, 7)
    assert torch.equal(stratified_fraction(s, 0.25, seed=0).rows, sub.rows)
    assert not torch.equal(stratified_fraction(s, 0.25, seed=1).rows, sub.rows)
    assert stratified_fraction(s, 1.0, seed=0) is s
    assert class_counts(stratified_fraction(s, 0.01, seed=0), 3).tolist() == [1, 1, 1]
    for bad in (0, -0.5, 1.5):
        with pytest.raises(UserError, match="fraction must be in"):
            stratified_fraction(s, bad, seed=0)


def test_split_subset_accepts_lists_masks_arrays_and_empty() -> None:
    s = toy_split([0, 1, 2, 3])
    assert s.subset([2, 0]).rows.tolist() == [2, 0]
    assert s.subset(np.array([True, False, True, False])).y.tolist() == [0, 2]
    assert s.subset(torch.tensor([3])).x.shape == (1, 48, 48)
    assert len(s.subset([])) == 0 and len(s.subset(slice(1, 3))) == 2


def test_duplicate_mask_and_class_counts() -> None:
    train = toy_split([0, 1, 2])
    x = torch.stack([train.x[2], torch.from_numpy(image(99)), train.x[0], train.x[0].flip(0)])
    test = Split(x, torch.tensor([2, 0, 0, 0]), torch.arange(4))
    assert duplicate_mask(test, train).tolist() == [True, False, True, False]
    assert class_counts(test, 7).tolist() == [3, 0, 1, 0, 0, 0, 0]


# --------------------------------------------------------------------------- FER+

FERPLUS_HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
# One row per SMALL_ROWS row: (image name, 10 votes); comments give the expected outcome.
FERPLUS_ROWS = [
    ("fer0000000.png", [5, 0, 0, 2, 1, 1, 1, 0, 0, 0]),   # 0: 5 of 10 is no majority, but without
                                                          #    the single votes 5 of 7 is: neutral
    ("fer0000001.png", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10]),  # 1: NF majority -> dropped
    ("", [0, 7, 0, 0, 0, 0, 0, 0, 0, 3]),                 # 2: empty name, happiness (join is by position)
    ("fer0000001.png", [0, 0, 4, 4, 0, 0, 0, 0, 2, 0]),   # 3: repeated name; surprise/sadness tie -> dropped
    ("fer0000004.png", [1, 0, 0, 0, 0, 0, 0, 0, 6, 3]),   # 4: unknown majority -> dropped
    ("fer0000005.png", [0, 0, 0, 0, 0, 0, 0, 9, 0, 0]),   # 5: contempt (PublicTest)
    ("fer0000006.png", [0, 0, 0, 0, 0, 5, 5, 0, 0, 0]),   # 6: disgust/fear, 5 of 10 -> dropped
    ("", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10]),                # 7: PrivateTest, not a face
    ("fer0000008.png", [0, 0, 0, 0, 0, 0, 3, 0, 0, 0]),   # 8: fear, only 3 votes, all of them
]


def write_ferplus(path: Path, rows=FERPLUS_ROWS, usages=None) -> Path:
    usages = usages or [u for _, u in SMALL_ROWS]
    lines = [f"{u},{name}," + ",".join(map(str, v)) for u, (name, v) in zip(usages, rows)]
    path.write_text("\n".join([FERPLUS_HEADER, *lines]) + "\n")
    return path


def test_ferplus_labels_by_row_position(small_csv: Path) -> None:
    write_ferplus(small_csv.parent / "fer2013new.csv")
    d = load_fer2013(small_csv, labels="ferplus", splits=SPLITS)
    assert d.classes == FERPLUS_CLASSES and d.num_classes == 8
    assert d.train.rows.tolist() == [0, 2] and d.train.y.tolist() == [0, 1]
    assert np.array_equal(d.train.x[1].numpy(), image(2))
    assert d.val.rows.tolist() == [5] and d.val.y.tolist() == [7]
    assert d.test.rows.tolist() == [8] and d.test.y.tolist() == [6]
    assert d.train.soft.dtype == torch.float32 and d.train.soft.shape == (2, 8)
    assert torch.allclose(d.train.soft[0], torch.tensor([5, 0, 0, 2, 0, 0, 0, 0]) / 7)  # single votes dropped
    assert torch.allclose(d.test.soft[0], torch.eye(8)[6])


def test_ferplus_errors(small_csv: Path, tmp_path: Path) -> None:
    expected = small_csv.parent / "fer2013new.csv"
    with pytest.raises(UserError, match=rf"FER\+ votes not found at {re.escape(str(expected))}"):
        load_fer2013(small_csv, labels="ferplus")
    short = write_ferplus(tmp_path / "short.csv", FERPLUS_ROWS[:-1])
    with pytest.raises(UserError, match=rf"{re.escape(str(short))} has 8 data rows but fer2013.csv has 9"):
        load_fer2013(small_csv, labels="ferplus", ferplus_path=short)
    rows = list(FERPLUS_ROWS)
    rows[4] = ("x.png", [1, 0, 0, "two", 0, 0, 0, 0, 0, 0])
    bad = write_ferplus(tmp_path / "bad.csv", rows)
    with pytest.raises(UserError, match=rf"{re.escape(str(bad))}, line 6: sadness vote 'two'"):
        load_fer2013(small_csv, labels="ferplus", ferplus_path=bad)
    usages = [u for _, u in SMALL_ROWS]
    usages[6] = "Training"
    other = write_ferplus(tmp_path / "other.csv", usages=usages)
    with pytest.raises(UserError, match=rf"{re.escape(str(other))}, line 8: .*does not match"):
        load_fer2013(small_csv, labels="ferplus", ferplus_path=other)


# FER+ votes beside the FER2013 labels (the label audit, the ferplus_votes target): SMALL_ROWS' labels are
# angry, happy, neutral, happy, disgust | sad, surprise | fear, neutral.
FERPLUS_MAJORITY7 = [6, -1, 3, -1, -1, -1, -1, -1, 2]   # neutral, -, happy, -, -, -, -, -, fear
FERPLUS_REASONS = ["", "not_face", "", "no_majority", "unknown", "contempt", "no_majority", "not_face", ""]


def test_ferplus_majority_as_fer2013_emotions_with_the_reason_for_each_left_out():
    labels, reasons = majority7(np.array([v for _, v in FERPLUS_ROWS]))
    assert labels.tolist() == FERPLUS_MAJORITY7
    assert reasons.tolist() == FERPLUS_REASONS


def test_folded_votes_and_the_targets_they_make():
    v = np.array([v for _, v in FERPLUS_ROWS])
    folded = fold_votes(v)
    assert folded.shape == (9, 7)   # angry, disgust, fear, happy, sad, surprise, neutral
    assert np.allclose(folded[0], np.array([0, 0, 0, 0, 2, 0, 5]) / 7)   # single votes dropped
    assert np.allclose(folded[2], np.eye(7)[3]) and np.allclose(folded[6], [0, 0.5, 0.5, 0, 0, 0, 0])
    assert not folded[[1, 4, 5, 7]].any()   # not a face, unknown, contempt: no FER2013 emotion to give
    y = torch.tensor([y for y, _ in SMALL_ROWS])
    half = vote_targets(torch.from_numpy(v).short(), y, 0.5)
    assert torch.allclose(half[0], torch.tensor([0.5, 0, 0, 0, 1 / 7, 0, 5 / 14]))   # label angry
    assert torch.equal(half[1], torch.eye(7)[3])   # no vote left: the label alone
    assert torch.allclose(half.sum(dim=1), torch.ones(9))
    assert torch.equal(vote_targets(torch.from_numpy(v).short(), y, 0.0), torch.eye(7)[y])
    with pytest.raises(UserError, match="ferplus_votes must be in"):
        vote_targets(torch.from_numpy(v), y, 1.5)


def test_votes_ride_beside_the_fer2013_labels(small_csv: Path, tmp_path: Path, capsys) -> None:
    assert load_fer2013(small_csv, splits=SPLITS, votes=True).test.votes is None   # no file: none, quietly
    write_ferplus(small_csv.parent / "fer2013new.csv")
    d = load_fer2013(small_csv, splits=SPLITS, votes=True)
    assert d.classes == EMOTIONS and d.train.y.tolist() == [0, 3, 6, 3, 1]   # the labels stay FER2013's
    assert d.train.votes.dtype == torch.int16 and d.train.votes.shape == (5, 10)
    assert d.test.votes.tolist() == [FERPLUS_ROWS[7][1], FERPLUS_ROWS[8][1]]
    assert d.train.subset([1, 3]).votes.tolist() == [FERPLUS_ROWS[1][1], FERPLUS_ROWS[3][1]]
    assert load_fer2013(small_csv, splits=SPLITS).test.votes is None           # only when asked
    assert load_fer2013(small_csv, labels="ferplus", splits=SPLITS, votes=True).test.votes is None
    rows = list(FERPLUS_ROWS)
    rows[4] = ("x.png", [1, 0, 0, "two", 0, 0, 0, 0, 0, 0])
    write_ferplus(small_csv.parent / "fer2013new.csv", rows)
    assert load_fer2013(small_csv, splits=SPLITS, votes=True).train.votes is None   # a file not named: warned
    assert "warning: FER+ votes not used" in capsys.readouterr().err
    bad = write_ferplus(tmp_path / "bad.csv", rows)
    with pytest.raises(UserError, match="sadness vote 'two'"):                      # a file named: an error
        load_fer2013(small_csv, splits=SPLITS, votes=True, ferplus_path=bad)


def test_a_vote_target_needs_votes(small_csv: Path) -> None:
    d = load_fer2013(small_csv, splits=SPLITS)
    with pytest.raises(UserError, match="ferplus_votes needs the FER2013 labels with their FER\\+ votes"):
        to_device(d.train, 7, torch.device("cpu"), votes=0.5)
    write_ferplus(small_csv.parent / "fer2013new.csv")
    d = load_fer2013(small_csv, splits=SPLITS, votes=True)
    target = to_device(d.train, 7, torch.device("cpu"), votes=0.5).target
    assert torch.equal(target, vote_targets(d.train.votes, d.train.y, 0.5))
    assert torch.equal(to_device(d.train, 7, torch.device("cpu")).target, torch.eye(7)[d.train.y])


# --------------------------------------------------------------------------- the real data

REAL = SHARED_FER
README_COUNTS = {   # README table: Angry, Disgust, Fear, Happy, Sad, Surprise, Neutral
    "Training": [3995, 436, 4097, 7215, 4830, 3171, 4965],
    "PublicTest": [467, 56, 496, 895, 653, 415, 607],
    "PrivateTest": [491, 55, 528, 879, 594, 416, 626],
}
TOTAL = {name: sum(c) for name, c in README_COUNTS.items()}
FIRST = {"Training": 0, "PublicTest": 28709, "PrivateTest": 32298}
FERPLUS_MAJORITY = {"Training": 25060, "PublicTest": 3199, "PrivateTest": 3153}  # the README's counts


@pytest.fixture(scope="module")
def real_csv(real_fer_csv: Path) -> Path:
    """The session's one copy of the real fer2013.csv (see conftest), written once for every module."""
    return real_fer_csv


@pytest.mark.slow
def test_real_csv_counts_protocol_and_cache(real_csv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = load_fer2013(real_csv)
    assert list(d.splits) == ["Training", "PublicTest"]
    with pytest.raises(UserError, match="PrivateTest was not loaded"):
        d.test
    for name, split in d.splits.items():
        assert class_counts(split, 7).tolist() == README_COUNTS[name]
        assert split.rows.tolist() == list(range(FIRST[name], FIRST[name] + len(split)))
    assert d.train.x[0, 0, :8].tolist() == [70, 80, 82, 72, 58, 58, 60, 63]
    pixels = np.load(REAL / "fer2013.npz")["pixels"]
    assert np.array_equal(d.val.x.numpy(), pixels[28709:32298])
    assert not (real_csv.parent / "fer2013.csv.cache" / "PrivateTest.npz").exists()
    forbid_parse(monkeypatch)
    again = load_fer2013(real_csv)
    assert torch.equal(again.train.x, d.train.x)
    monkeypatch.undo()
    test = load_fer2013(real_csv, splits=["PrivateTest"]).test
    assert class_counts(test, 7).tolist() == README_COUNTS["PrivateTest"]
    dup = duplicate_mask(d.val, d.train)
    seen = {row.tobytes() for row in pixels[:28709]}
    assert dup.tolist() == [row.tobytes() in seen for row in pixels[28709:32298]] and dup.any()


@pytest.mark.slow
def test_real_ferplus(real_csv: Path) -> None:
    d = load_fer2013(real_csv, labels="ferplus", ferplus_path=REAL / "fer2013new.csv", splits=SPLITS)
    with open(REAL / "fer2013new.csv", newline="") as f:
        table = list(csv.reader(f))[1:]
    for name, split in d.splits.items():
        expected = []   # an independent, plain-Python reading of Microsoft's majority rule
        for r in range(FIRST[name], FIRST[name] + TOTAL[name]):
            votes = [int(v) if int(v) > 1 else 0 for v in table[r][2:]]
            top = max(votes)
            if top > sum(votes) / 2 and votes.index(top) < 8:
                expected.append(r)
        assert split.rows.tolist() == expected
        assert len(split) == FERPLUS_MAJORITY[name]
        assert torch.allclose(split.soft.sum(1), torch.ones(len(split)))
        assert torch.equal(split.y, split.soft.argmax(1))
    kept = set(torch.cat([s.rows for s in d.splits.values()]).tolist())
    empty_names = {r for r, row in enumerate(table) if not row[1]}
    assert len(empty_names) == 173 and not kept & empty_names
    assert not kept & {6458, 7629, 10423, 11286, 13148, 13402, 13988, 15894, 22198, 22927, 28601, 30002}


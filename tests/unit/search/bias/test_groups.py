"""The per-group bias report (`search.bias.groups`, `search.evaluate --groups`): hand-computed numbers, the real CLI
on demo data and on a Kaggle-style image folder, and one-line errors for bad groups files. No Ray, a few seconds."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import search.evaluate
from search.bias.groups import (
    GROUP_COLUMNS,
    _macro_recall_rows,
    group_report,
    labels_for_split,
    macro_recall,
    read_groups,
)
from tests.helpers import as_command
from trainables.data import EMOTIONS, SPLITS, load_fer2013, make_demo
from trainables.errors import UserError
from trainables.inference import predict
from trainables.models import build_model
from trainables.weights import load_weights, save_weights

evaluate_main = as_command(search.evaluate.main)


def _weights(path):
    """A small untrained ConvNet whose random weights still spread its predictions over several classes."""
    torch.manual_seed(0)
    model = build_model("convnet", num_classes=7, width=8, depth=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:   # the default init predicts one class for every demo face; this spreads them
                p.normal_(0, 0.2)
    return save_weights(path, model.state_dict(), config={"width": 8, "depth": 2}, classes=EMOTIONS)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Weights laid out as the final stage writes them, so the default --out is `final/groups/`."""
    return _weights(tmp_path_factory.mktemp("groups") / "results" / "x" / "final" / "models" / "m")


_run = evaluate_main  # `python -m search.evaluate argv` in process


# --------------------------------------------------------------------------- by hand

def test_group_report_matches_a_hand_computation():
    # Group a: true 0 0 0 1, predicted 0 0 1 1 -> accuracy 3/4; recall 2/3 (class 0), 1 (class 1): macro 5/6.
    # Group b: true 1 2 2 3, all right -> accuracy 1, macro recall 1, and every resample is perfect too.
    # Group c: one wrong image -> reported, but too small (support 1 < 2) to enter the gap.
    # One image without a label for the attribute is left out.
    y_true = [0, 1, 0, 2, 0, 2, 1, 3, 4, 5]
    y_pred = [0, 1, 0, 2, 1, 2, 1, 3, 0, 5]
    groups = {"attr": ["a", "b", "a", "b", "a", "b", "a", "b", "c", ""]}
    table = group_report(y_true, y_pred, groups, n_boot=400)
    assert list(table.columns) == GROUP_COLUMNS
    by = table.set_index(["kind", "group"])
    a, b, c, gap = by.loc[("group", "a")], by.loc[("group", "b")], by.loc[("group", "c")], by.loc[("gap", "")]
    assert (a["support"], b["support"], c["support"]) == (4, 4, 1)
    assert a["accuracy"] == pytest.approx(0.75) and a["macro_recall"] == pytest.approx(5 / 6)
    assert b["accuracy"] == 1 and b["macro_recall"] == 1
    assert (b["accuracy_lo"], b["accuracy_hi"], b["macro_recall_lo"], b["macro_recall_hi"]) == (1, 1, 1, 1)
    assert c["accuracy"] == 0 and not c["in_gap"] and a["in_gap"] and b["in_gap"]
    assert gap["support"] == 8   # c is not in the gap
    assert gap["accuracy"] == pytest.approx(0.25) and gap["macro_recall"] == pytest.approx(1 / 6)
    assert (gap["accuracy_worst"], gap["accuracy_best"]) == ("a", "b")
    assert (gap["macro_recall_worst"], gap["macro_recall_best"]) == ("a", "b")
    for _, row in table.iterrows():
        for metric in ("accuracy", "macro_recall"):
            assert row[f"{metric}_lo"] <= row[f"{metric}_hi"]
            if row["kind"] == "group":
                assert row[f"{metric}_lo"] <= row[metric] <= row[f"{metric}_hi"]
    # b is perfect in every replicate, so the gap's replicates are 1 - a's: inside [0, 1 - min of a].
    assert 0 <= gap["accuracy_lo"] <= gap["accuracy"] <= gap["accuracy_hi"] <= 1
    assert group_report(y_true, y_pred, groups, n_boot=400).equals(table)   # seeded: the same numbers again


def test_vectorised_macro_recall_is_sklearns():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 7, size=(50, 30))
    pred = np.where(rng.random((50, 30)) < 0.6, y, rng.integers(0, 7, size=(50, 30)))
    fast = _macro_recall_rows(y, (y == pred).astype(float), 7)
    assert fast == pytest.approx([macro_recall(y[i], pred[i]) for i in range(len(y))])


# --------------------------------------------------------------------------- end to end on demo data

def test_evaluate_groups_end_to_end_on_demo(weights, tmp_path, capsys):
    test = make_demo(splits=["PrivateTest"]).test   # a demo split does not depend on the others loaded
    rows = test.rows.numpy()
    names = np.array(["young", "middle", "old"])[rows % 3]
    names[rows % 7 == 0] = ""          # not labelled
    lines = ["row,age_band"] + [f"{r},{g}" for r, g in zip(rows, names)] + ["99999,old"]   # 99999: not in the split
    groups = tmp_path / "groups.csv"
    groups.write_text("\n".join(lines) + "\n")
    status = _run(["--model", str(weights), "--data", "demo", "--tta", "none", "--groups", str(groups),
                   "--bootstrap", "200"])
    out = capsys.readouterr().out
    assert status == 0, out
    labelled = int((names != "").sum())
    assert f"groups: {labelled} of {len(test)} PrivateTest images have group labels ({groups})" in out
    out_dir = weights.parent.parent / "groups"    # results/x/final/groups/
    csv, png = out_dir / "m-PrivateTest-groups.csv", out_dir / "m-PrivateTest-groups.png"
    assert f"group report: {csv}" in out and f"group figure: {png}" in out
    table = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    per_group = table[table["kind"] == "group"].set_index("group")
    assert per_group["support"].sum() == labelled
    model, _ = load_weights(weights)
    pred = predict(model, test.x).numpy().argmax(1)
    y = test.y.numpy()
    assert len(np.unique(pred)) > 1   # the check below would be weak if every face got one class
    for name in ("young", "middle", "old"):
        keep = names == name
        assert per_group.loc[name, "accuracy"] == pytest.approx((pred[keep] == y[keep]).mean(), abs=1e-12)
        assert per_group.loc[name, "macro_recall"] == pytest.approx(macro_recall(y[keep], pred[keep]), abs=1e-12)
    gap = table[table["kind"] == "gap"].iloc[0]
    assert gap["accuracy"] == pytest.approx(per_group["accuracy"].max() - per_group["accuracy"].min())
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- file keys on an image folder

def _kaggle_folder(root):
    """Kaggle's image release in miniature: the split lives in the file names, test/ holds both test splits."""
    files = {"train/angry/Training_1.png": 10, "train/happy/Training_2.png": 20,
             "test/angry/PrivateTest_20.png": 30, "test/angry/PrivateTest_21.png": 40,
             "test/angry/PublicTest_10.png": 50, "test/happy/PrivateTest_22.png": 60,
             "test/happy/PublicTest_11.png": 70}
    for name, shade in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (48, 48), color=shade).save(root / name)
    return root


def test_file_keys_on_an_image_folder(tmp_path, capsys):
    root = _kaggle_folder(tmp_path / "kaggle")
    groups = tmp_path / "groups.csv"
    groups.write_text("file,lighting\n"
                      "test/angry/PrivateTest_20.png,dim\n"      # path relative to the data root
                      "PrivateTest_21.png,bright\n"              # bare name, unique
                      "test\\happy\\PrivateTest_22.png,dim\n"    # Windows separators
                      "Training_1.png,bright\n"                  # another split: allowed, left out
                      "PublicTest_10.png,dim\n")
    test = load_fer2013(root, splits=SPLITS).test
    labels = labels_for_split(read_groups(groups), test.rows.numpy(), data=str(root), split="PrivateTest")
    shades = test.x[:, 0, 0].tolist()   # which file each image of the split is
    assert dict(zip(shades, labels["lighting"])) == {30: "dim", 40: "bright", 60: "dim"}
    absolute = tmp_path / "absolute.csv"
    absolute.write_text(f"file,lighting\n{root / 'test' / 'happy' / 'PrivateTest_22.png'},dim\n")
    labels = labels_for_split(read_groups(absolute), test.rows.numpy(), data=str(root), split="PrivateTest")
    assert dict(zip(shades, labels["lighting"])) == {30: "", 40: "", 60: "dim"}

    weights = _weights(tmp_path / "w" / "m")
    status = _run(["--model", str(weights), "--data", str(root), "--tta", "none", "--groups", str(groups),
                   "--bootstrap", "50", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert status == 0 and "groups: 3 of 3 PrivateTest images have group labels" in out
    table = pd.read_csv(tmp_path / "out" / "m-PrivateTest-groups.csv", keep_default_na=False, na_values=[""])
    support = table[table["kind"] == "group"].set_index("group")["support"].to_dict()
    assert support == {"bright": 1, "dim": 2}
    assert not table.set_index("group").loc["bright", "in_gap"]   # 1 image: reported, not in the gap

    # A bare name two files share is refused: say which one by its path.
    Image.new("L", (48, 48)).save(root / "test" / "happy" / "PrivateTest_21.png")
    with pytest.raises(UserError, match="names 2 images"):
        labels_for_split(read_groups(groups), test.rows.numpy(), data=str(root), split="PrivateTest")


# --------------------------------------------------------------------------- bad groups files

BAD = {
    "missing file": (None, "does not exist"),
    "no key column": ("image,gender\n1,f\n", "needs exactly one key column"),
    "both key columns": ("row,file,gender\n1,a.png,f\n", "both 'row' and 'file'"),
    "no attribute column": ("row\n1\n2\n", "no attribute column"),
    "no key in the split": ("row,gender\n50000,f\n60000,m\n", "no key of groups file"),
    "duplicated key": ("row,gender\n1,f\n2,m\n1,m\n", "appears twice (lines 2 and 4)"),
    "non-integer row": ("row,gender\n1,f\nfive,m\n", "line 3: row 'five' is not a non-negative integer"),
    "file keys on demo": ("file,gender\na.png,f\n", "needs an image-folder --data"),
    "all blank": ("row,gender\n1,\n2,\n", "have no group label"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_groups_file_is_one_line_exit_2(weights, tmp_path, capsys, case):
    body, needle = BAD[case]
    path = tmp_path / "groups.csv"
    if body is not None:
        path.write_text(body)
    status = _run(["--model", str(weights), "--data", "demo", "--tta", "none", "--groups", str(path),
                   "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in out + err and not (tmp_path / "out").exists()


def test_group_flags_need_groups(weights, capsys):
    assert _run(["--model", str(weights), "--data", "demo", "--bootstrap", "10"]) == 2
    assert "add --groups FILE" in capsys.readouterr().err

"""The label audit end to end: `search.run` on the demo data with a synthetic FER+ votes file beside it.

The votes follow a rule on the row number `r` of fer2013.csv and its FER2013 label `y`, so every figure
of the audit can be counted by hand from the model's mistakes (final/misclassified.csv):

    r % 4 == 0   ten votes for y               the FER+ majority agrees with the label
    r % 4 == 1   ten votes for (y + 1) % 7     FER+ relabels the image
    r % 4 == 2   ten votes for contempt        no FER2013 counterpart: left out
    r % 4 == 3   five for y, five for y + 1    no majority: left out

The search sees the votes too (trials.csv has `ferplus_votes`), and `search.evaluate` on the final
model writes the same audit.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spaces import VOTE_SHARES
from tests.helpers import DEMO_SIZES, read_table, run_command
from trainables.data import EMOTIONS
from trainables.data.ferplus import FER2013_COLUMNS, FERPLUS_COLUMNS, VOTE_COLUMNS

pytestmark = pytest.mark.slow
CONTEMPT = VOTE_COLUMNS.index("contempt")


def synthetic_votes(csv) -> pd.DataFrame:
    """The rule of the module doc, as Microsoft's fer2013new.csv lays it out (one line per fer2013.csv row)."""
    data = pd.read_csv(csv)
    y, usage = data["emotion"].to_numpy(), data["Usage"].to_numpy()
    votes = np.zeros((len(data), len(VOTE_COLUMNS)), dtype=int)
    for r, label in enumerate(y):
        own, next_ = FER2013_COLUMNS[label], FER2013_COLUMNS[(label + 1) % 7]
        kind = r % 4
        if kind == 0:
            votes[r, own] = 10
        elif kind == 1:
            votes[r, next_] = 10
        elif kind == 2:
            votes[r, CONTEMPT] = 10
        else:
            votes[r, own] = votes[r, next_] = 5
    frame = pd.DataFrame(votes, columns=list(VOTE_COLUMNS))
    frame.insert(0, "Image name", [f"fer{r:07d}.png" for r in range(len(data))])
    frame.insert(0, "Usage", usage)
    assert tuple(frame.columns) == FERPLUS_COLUMNS
    return frame


@pytest.fixture(scope="module")
def run(demo_csvs, tmp_path_factory):
    """A short search with the votes beside the data: 3 trials of 1 epoch, then 1 configuration x 1 seed."""
    root = tmp_path_factory.mktemp("votes")
    csv = root / "fer2013.csv"
    csv.write_bytes(demo_csvs["good"].read_bytes())
    synthetic_votes(csv).to_csv(root / "fer2013new.csv", index=False)
    r = run_command("search.run", "--space", "convnet", "--data", str(csv), "--num-samples", "3", "--max-epochs", "1",
                    "--grace-epochs", "1", "--no-known-good", "--max-concurrent", "1", "--final-top-k", "1",
                    "--final-seeds", "1", "--final-epochs", "1", "--results", str(root / "results"), "--name", "votes",
                    "--seed", "3")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"root": root, "csv": csv, "exp": root / "results" / "votes", "stdout": r.stdout}


def hand_count(csv, misclassified: pd.DataFrame) -> dict:
    """The audit's "all" row and cleanlab's base rate, counted from the rule and the model's mistakes."""
    data = pd.read_csv(csv)
    test = data.index[data["Usage"] == "PrivateTest"].to_numpy()
    y = dict(zip(test, data.loc[test, "emotion"]))
    pred = {r: EMOTIONS.index(p) for r, p in zip(misclassified["row"], misclassified["predicted"])}
    right = {r: r not in pred for r in test}
    kinds = {k: [r for r in test if r % 4 == k] for k in range(4)}
    judged = kinds[0] + kinds[1]
    ferplus = {**{r: y[r] for r in kinds[0]}, **{r: (y[r] + 1) % 7 for r in kinds[1]}}
    ferplus_right = [r for r in judged if pred.get(r, y[r]) == ferplus[r]]
    wrong_judged = [r for r in judged if r in pred]
    return {
        "n": len(test), "n_ferplus": len(judged), "n_contempt": len(kinds[2]), "n_no_majority": len(kinds[3]),
        "n_agreed": len(kinds[0]), "label_agreement": len(kinds[0]) / len(judged),
        "accuracy": sum(right.values()) / len(test),
        "accuracy_ferplus": len(ferplus_right) / len(judged),
        "accuracy_agreed": sum(right[r] for r in kinds[0]) / len(kinds[0]),
        "accuracy_either": len(set(r for r in test if right[r]) | set(ferplus_right)) / len(test),
        "mistakes": len(pred), "mistakes_ferplus": len(wrong_judged),
        "ferplus_sides_model": sum(pred[r] == ferplus[r] for r in wrong_judged) / len(wrong_judged),
        "ferplus_sides_label": sum(ferplus[r] == y[r] for r in wrong_judged) / len(wrong_judged),
        "ferplus_sides_neither": sum(ferplus[r] not in (y[r], pred[r]) for r in wrong_judged) / len(wrong_judged),
        "base_rate": len(kinds[1]) / len(judged), "judged": judged, "relabelled": set(kinds[1]),
    }


def test_search_tries_the_vote_share_and_says_so(run):
    assert "FER+ votes found" in run["stdout"]
    trials = read_table(run["exp"] / "trials.csv")
    shares = set(trials["config/ferplus_votes"])
    assert shares <= set(VOTE_SHARES) and max(shares) > 0, shares


def test_final_audit_matches_a_hand_count(run):
    final = run["exp"] / "final"
    for name in ("label_audit.csv", "label_issues.csv", "label_issues_summary.csv", "label_audit.png"):
        assert (final / name).is_file(), name
    wrong = read_table(final / "misclassified.csv")
    table = read_table(final / "label_audit.csv")
    assert set(table["model"]) == set(wrong["model"]) and set(table["tta"]) == set(wrong["tta"])
    assert list(table["emotion"]) == ["all", *EMOTIONS]
    every = table.iloc[0]
    want = hand_count(run["csv"], wrong)
    assert want["n"] == DEMO_SIZES["PrivateTest"] and 0 < want["mistakes_ferplus"] < want["n_ferplus"]
    for key in ("n", "n_ferplus", "n_contempt", "n_no_majority", "n_agreed", "mistakes", "mistakes_ferplus"):
        assert every[key] == want[key], key
    assert every["n_unknown"] == every["n_not_face"] == 0
    for key in ("label_agreement", "accuracy", "accuracy_ferplus", "accuracy_agreed", "accuracy_either",
                "ferplus_sides_model", "ferplus_sides_label", "ferplus_sides_neither"):
        assert every[key] == pytest.approx(want[key]), key
    assert every["noise_points"] == pytest.approx(want["accuracy_either"] - want["accuracy"])
    # Per emotion the counts add up to the whole.
    per = table.iloc[1:]
    assert per["n"].sum() == every["n"] and per["mistakes_ferplus"].sum() == every["mistakes_ferplus"]

    # cleanlab: every flagged image is ranked once, and its precision against FER+ is the share of the
    # flagged images with a FER+ majority (r % 4 in 0, 1) that FER+ relabels (r % 4 == 1).
    issues = read_table(final / "label_issues.csv")
    summary = read_table(final / "label_issues_summary.csv")
    flagged = summary[summary["flag"] == "cleanlab"].iloc[0]
    assert len(issues) == flagged["n_flagged"] > 0 and list(issues["rank"]) == list(range(1, len(issues) + 1))
    judged = [r for r in issues["row"] if r in set(want["judged"])]
    assert flagged["n_ferplus"] == len(judged)
    assert flagged["precision_ferplus"] == pytest.approx(sum(r in want["relabelled"] for r in judged) / len(judged))
    assert flagged["base_rate"] == pytest.approx(want["base_rate"])
    mistakes = summary[summary["flag"] == "model_mistakes"].iloc[0]
    assert mistakes["n_flagged"] == want["mistakes"]
    assert mistakes["precision_ferplus"] == pytest.approx(want["ferplus_sides_model"] + want["ferplus_sides_neither"])
    assert summary[summary["flag"] == "every_image"].iloc[0]["precision_ferplus"] == pytest.approx(want["base_rate"])
    assert f"{want['accuracy_agreed']:.1%} where the two agree" in run["stdout"]


def test_evaluate_writes_the_same_audit_and_the_report_shows_it(run, tmp_path):
    final = run["exp"] / "final"
    analysed = read_table(final / "label_audit.csv")["model"].iloc[0]
    model = final / "models" / f"{analysed}.pt"
    r = run_command("search.evaluate", "--model", str(model), "--data", str(run["csv"]), "--tta", "none")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "labels against FER+" in r.stdout and "cleanlab" in r.stdout
    prefix = f"{model.stem}-PrivateTest-"
    again = read_table(final / "labels" / f"{prefix}label_audit.csv")
    numbers = [c for c in again.columns if c not in ("model", "tta", "emotion")]
    pd.testing.assert_frame_equal(again[numbers], read_table(final / "label_audit.csv")[numbers], check_dtype=False)
    assert (final / "labels" / f"{prefix}label_audit.png").is_file()

    # Without the votes file there is no audit, and no error.
    alone = tmp_path / "fer2013.csv"
    alone.write_bytes(run["csv"].read_bytes())
    r = run_command("search.evaluate", "--model", str(model), "--data", str(alone), "--out", str(tmp_path / "o"))
    assert r.returncode == 0 and "labels against FER+" not in r.stdout, r.stderr[-2000:]

    html = (run["exp"] / "report.html").read_text()
    assert "Labels against FER+" in html and "FER+ sides with the model on" in html

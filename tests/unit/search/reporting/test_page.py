"""The report's headline: the PrivateTest figures of the models chosen on PublicTest, never the best on PrivateTest."""
from __future__ import annotations

import pandas as pd

from search.reporting.page import summary


def test_the_headline_reports_the_models_chosen_on_public_test(tmp_path):
    (tmp_path / "final").mkdir()
    rows = [  # run A is better on PrivateTest, B on PublicTest: B is the exported model
        {"kind": "run", "config": "A", "tta": "none", "val_acc": 0.62, "accuracy": 0.66},
        {"kind": "run", "config": "B", "tta": "none", "val_acc": 0.64, "accuracy": 0.65},
        {"kind": "run", "config": "B", "tta": "flip", "val_acc": 0.70, "accuracy": 0.70},  # TTA: not the headline
        {"kind": "ensemble_all", "config": "A+B", "tta": "none", "val_acc": 0.66, "accuracy": 0.67},
        {"kind": "ensemble_best", "config": "B", "tta": "none", "val_acc": 0.64, "accuracy": 0.69},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "final" / "metrics.csv", index=False)
    trials = pd.DataFrame({"objective": [0.6, 0.5]})
    line = summary(trials, tmp_path)
    assert "run chosen on PublicTest 65.0%" in line and "average 65.5%" in line
    assert "ensemble chosen on PublicTest 67.0%" in line
    assert "66.0%" not in line and "69.0%" not in line and "70.0%" not in line


def test_pareto_front_by_hand():
    from search.reporting.search_figures import pareto_mask

    cost = [1.0, 2.0, 2.0, 3.0, 0.5, 4.0]
    acc = [0.50, 0.60, 0.55, 0.60, 0.40, 0.70]
    # (2, .55) is beaten by (2, .60); (3, .60) by (2, .60); the rest trade cost for accuracy
    assert pareto_mask(cost, acc).tolist() == [True, True, False, False, True, True]

"""The distilled student's plan (`search.final_stage.student`): its teachers, where it starts, how it trains."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from search.final_stage.candidates import Candidate
from search.final_stage.retrain import FinalRun
from search.final_stage.student import PREFIX, plan_student, teachers_of
from trainables.config import TrialConfig

Y = np.array([0, 1, 2, 0])


def _probs(preds) -> np.ndarray:
    out = np.full((len(preds), 3), 0.1)
    out[np.arange(len(preds)), preds] = 0.8
    return out


def _run(rank: int, seed: int, preds, val_acc: float) -> FinalRun:
    cand = Candidate(rank=rank, trial_id=f"t{rank}", config=TrialConfig(lr=0.01, schedule="onecycle",
                                                                         warmup_fraction=0.2), search_val_acc=0.5)
    return FinalRun(candidate=cand, seed=seed, weights=Path(f"/nowhere/top{rank}-seed{seed}.pt"), best_epoch=3,
                    val_acc=val_acc, val_probs={"none": _probs(preds)})


def test_the_teachers_are_the_better_ensemble_of_two_runs_or_more():
    # ensemble_all (3 runs) is right on 3 of 4; ensemble_best (the best run of each configuration) on 4 of 4
    a1, a2, b1 = _run(1, 1, [0, 1, 2, 1], 0.75), _run(1, 2, [0, 2, 2, 1], 0.5), _run(2, 1, [0, 1, 2, 0], 1.0)
    assert [r.name for r in teachers_of([a1, a2, b1], Y)] == [a1.name, b1.name]
    # one configuration: ensemble_best is its best run alone, so ensemble_all (both seeds) teaches
    assert [r.name for r in teachers_of([a1, a2], Y)] == [a1.name, a2.name]
    # one run: no ensemble, no student
    assert teachers_of([a1], Y) == [] and plan_student([a1], Y) is None


def test_the_student_fine_tunes_the_best_run_on_soft_targets():
    a1, a2 = _run(1, 1, [0, 1, 2, 1], 0.75), _run(1, 2, [0, 2, 2, 1], 0.5)
    plan = plan_student([a1, a2], Y)
    assert plan.start is a1 and [r.name for r in plan.teachers] == [a1.name, a2.name]
    cfg = plan.candidate.config
    assert cfg.soft_labels and cfg.schedule == "cosine" and cfg.warmup_fraction == 0.0
    assert cfg.lr == pytest.approx(0.001) and cfg.ema_fraction == 0.0
    assert plan.candidate.name == f"{PREFIX}top1-t1" and plan.candidate.rank == 1
    assert plan.info == {"distilled_from": [a1.name, a2.name], "started_from": a1.name,
                         "distill_temperature": 2.0, "distill_weight": 0.7}

"""--time-budget: how the final stage is sized, what the search leaves it, and runs stopping at the deadline."""
from __future__ import annotations

import math

import pytest

from search.final_stage.retrain import retrain, without_test
from search.tuning.budget import (
    STOP_SECONDS,
    Clock,
    Measured,
    SearchBudget,
    final_reserve,
    fit_final_to_budget,
    full_epoch_seconds,
    plan_final,
    plan_seconds,
    student_seconds,
)
from search.tuning.records import TrialRecord
from search.tuning.settings import Settings
from trainables.config import TrialConfig
from trainables.data import SPLITS, make_demo
from trainables.errors import UserError

SIZES = {"n_full": 28709, "n_test": 3589, "ttas": 2}


def test_full_epoch_seconds_scales_only_the_training_part():
    # 7,000 images at 700 img/s is 10 s of training; the other 3 s (PublicTest) do not scale.
    m = Measured(objective=0.5, epoch_seconds=13.0, images_per_s=700.0)
    assert full_epoch_seconds(m, 7000, 28000) == pytest.approx(3.0 + 40.0)
    assert math.isnan(full_epoch_seconds(Measured(0.5, math.nan, 700.0), 7000, 28000))


def test_plan_seconds_runs_in_waves_as_long_as_their_slowest_run():
    # 3 runs of 10 and 20 s/epoch, 2 at once, 2 epochs: waves (40, 20) and (20) -> (40+5) + (20+5)
    assert plan_seconds([20.0, 10.0], slots=2, seeds=1, epochs=2) == pytest.approx(45.0)
    assert plan_seconds([20.0, 10.0], slots=2, seeds=2, epochs=2) == pytest.approx(45.0 + 25.0)


def test_plan_final_prefers_epochs_then_fills_the_parallel_slots():
    # Plenty of time: everything asked for.
    plan = plan_final([30.0, 30.0, 30.0], slots=2, top_k=3, seeds=3, epochs=10, seconds=1e6, **SIZES)
    assert (plan.top_k, plan.seeds, plan.epochs) == (3, 3, 10)
    # Time for about one wave of 10 epochs: 2 runs (both slots), full epochs, and at equal runs seeds come
    # before configurations: 2 seeds of the best (a seed mean and spread), not 1 seed each of the best 2.
    plan = plan_final([30.0, 30.0, 30.0], slots=2, top_k=3, seeds=3, epochs=10, seconds=400.0, **SIZES)
    assert (plan.top_k, plan.seeds, plan.epochs) == (1, 2, 10)
    assert plan.seconds <= 400.0
    # Less time: fewer epochs, in one wave that fills both slots.
    plan = plan_final([30.0, 30.0, 30.0], slots=2, top_k=3, seeds=3, epochs=10, seconds=200.0, **SIZES)
    assert plan.top_k * plan.seeds == 2 and 1 <= plan.epochs < 10 and plan.seconds <= 200.0
    # Not one epoch fits.
    assert plan_final([300.0], slots=2, top_k=3, seeds=3, epochs=10, seconds=100.0, **SIZES) is None


def test_distill_plans_the_student_after_the_runs():
    # Plenty of time: the runs as asked, then the student for a quarter of their epochs (at least 2).
    plan = plan_final([30.0, 30.0], slots=2, top_k=2, seeds=1, epochs=20, seconds=1e6, distill=True, **SIZES)
    assert (plan.top_k, plan.seeds, plan.epochs, plan.student_epochs) == (2, 1, 20, 5)
    assert plan.student_seconds == pytest.approx(student_seconds(2, 20, 30.0, 30.0))
    assert plan.seconds == pytest.approx(plan.training_seconds + plan.student_seconds + plan.eval_seconds)
    # The runs' pass over Training (each member) plus the student's epochs, at the best configuration's speed.
    assert student_seconds(2, 20, 30.0, 40.0) == pytest.approx(2 * 1.4 * 40.0 + 5 * 30.0 + 5.0)
    assert student_seconds(1, 20, 30.0, 30.0) == 0.0  # one run: no ensemble, no student
    # A tight budget: the student's time comes out of the runs' epochs, and the whole plan still fits.
    plain = plan_final([30.0, 30.0], slots=2, top_k=2, seeds=1, epochs=20, seconds=800.0, **SIZES)
    taught = plan_final([30.0, 30.0], slots=2, top_k=2, seeds=1, epochs=20, seconds=800.0, distill=True, **SIZES)
    assert taught.epochs < plain.epochs and taught.student_epochs >= 2 and taught.seconds <= 800.0
    assert (plain.top_k, taught.top_k) == (2, 2)
    assert plain.student_epochs == 0 and plain.student_seconds == 0.0
    # One run fits only: no student is planned.
    one = plan_final([30.0], slots=1, top_k=1, seeds=1, epochs=20, seconds=1e6, distill=True, **SIZES)
    assert one.student_epochs == 0 and one.student_seconds == 0.0


def test_the_search_leaves_what_the_final_stage_needs_capped_at_its_share():
    clock = Clock(total=3600.0)
    kw = dict(clock=clock, share=0.4, slots=2, top_k=2, seeds=1, epochs=10, n_search=7000, n_full=28000,
              n_test=3589, ttas=2)
    stop = STOP_SECONDS  # the search's own stop comes on top
    assert final_reserve([], **kw) == pytest.approx(0.4 * 3600 + stop)  # nothing measured yet: the whole share
    fast = [Measured(0.6, 3.0 + 7000 / 7000.0, 7000.0), Measured(0.5, 2.0, 7000.0)]
    need = final_reserve(fast, **kw)
    assert stop < need < 0.4 * 3600  # 10 epochs of ~7 s fit well within the share
    # 10 epochs of ~403 s do not fit the share: the reserve is what the plan that fits it uses (3 epochs
    # in one wave, and its scoring), not the whole share, whose rest would idle after the wave.
    slow = [Measured(0.6, 3.0 + 7000 / 70.0, 70.0)]
    plan = plan_final([3.0 + 28000 / 70.0], slots=2, top_k=2, seeds=1, epochs=10, seconds=0.4 * 3600, n_full=28000,
                      n_test=3589, ttas=2)
    assert plan.epochs == 3 and final_reserve(slow, **kw) == pytest.approx(plan.seconds + stop)
    assert plan.seconds < 0.4 * 3600
    # ... but never less than one epoch of the best configuration, even above the share.
    glacial = [Measured(0.6, 3.0 + 7000 / 1.0, 1.0)]
    assert final_reserve(glacial, **kw) > 28000 / 1.0
    # Only the best top_k trials count: a slow but weak trial does not inflate the reserve.
    assert final_reserve(fast + [Measured(0.1, 500.0, 10.0)], **kw) == pytest.approx(need)


def _budget(total: float, **kw) -> SearchBudget:
    return SearchBudget(clock=Clock(total=total), **{**dict(share=0.4, slots=2, top_k=2, seeds=1, epochs=10,
                                                           n_search=7000, n_full=28000, n_test=3589, ttas=2), **kw})


def test_without_a_final_stage_the_search_keeps_the_whole_budget():
    # --no-final used to reserve one full-data epoch of the best trial and its scoring anyway (here 28,000 s).
    slow = [Measured(0.6, 3.0 + 7000 / 1.0, 1.0)]
    assert _budget(3600.0, final=False).reserve(slow) == STOP_SECONDS
    assert _budget(3600.0).reserve(slow) > 28000


def test_the_search_never_stops_before_an_epoch_has_ended():
    # --time-budget 1200 --final-share 0.97: with nothing measured the share's 1,164 s used to be reserved,
    # so the search stopped after about 28 s, before any trial had finished an epoch.
    budget = _budget(1200.0, share=0.97)
    assert not budget.search_over([]) and not budget.search_over([Measured(math.nan, math.nan, math.nan)])
    # Once a trial has an epoch, the reserve is what the final stage needs, capped at the share: a fast
    # epoch leaves the search running, a slow one (the share's whole 1,164 s needed) stops it.
    assert not budget.search_over([Measured(0.5, 3.0 + 7000 / 7000.0, 7000.0)])
    assert budget.search_over([Measured(0.5, 3.0 + 7000 / 7.0, 7.0)])
    # Only the stop's own seconds left: stop even with nothing measured.
    late = _budget(1200.0, share=0.97)
    late.clock.started -= 1200.0 - STOP_SECONDS / 2
    assert late.search_over([])


def _trial(tid: str, objective: float, epoch_seconds: float) -> TrialRecord:
    return TrialRecord(trial_id=tid, status="TERMINATED", objective=objective, val_acc=objective, epochs=1,
                       images_per_s=math.nan, epoch_seconds=epoch_seconds, config={"arch": "convnet"})


def test_when_the_best_configuration_does_not_fit_a_cheaper_one_is_trained(tmp_path, capsys):
    data = make_demo(splits=SPLITS, n_train=1000, n_val=100, n_test=100)
    s = Settings(space="convnet", name="x", results=str(tmp_path), final_top_k=2, final_seeds=1, final_epochs=5,
                 train_fraction=1.0, cpus_per_trial=1, max_concurrent=1)
    # The best trial's epoch takes 500 s; the next two 2 s. 100 s are left.
    trials = [_trial("a", 0.6, 500.0), _trial("b", 0.5, 2.0), _trial("c", 0.4, 2.0)]
    clock = Clock(total=100.0)
    fitted, _, deadline, skip = fit_final_to_budget(s, trials, ["a", "b", "c"], clock, data, ["none"], None)
    assert skip == 1 and fitted.final_epochs >= 1 and deadline <= clock.deadline
    assert "does not fit" in capsys.readouterr().out
    # None fits: one line, naming the fastest.
    with pytest.raises(UserError, match="not enough for one epoch of any of the 2 best"):
        fit_final_to_budget(s, trials[:1] + [_trial("d", 0.5, 400.0)], ["a", "d"], clock, data, ["none"], None)


def test_final_epochs_0_means_max_epochs_in_search_final_too(tmp_path):
    from search.final import parse_final

    exp = tmp_path / "e"
    exp.mkdir()
    (exp / "settings.json").write_text(Settings(space="convnet", name="e", results=str(tmp_path), max_epochs=7,
                                                final_epochs=7).to_json())
    s, _, _ = parse_final([str(exp), "--final-epochs", "0", "--time-budget", "100"])
    assert s.final_epochs == 7 and s.time_budget == 100  # was 0: "not enough for one epoch" whatever the budget


class _Clock:
    """A clock that moves 0.25 s each time it is read, so that an epoch 'takes' 0.25 s whatever the machine."""

    def __init__(self):
        self.now = 1000.0

    def time(self) -> float:
        self.now += 0.25
        return self.now


def test_a_final_run_is_replanned_to_the_epochs_that_fit_the_deadline(one_thread, monkeypatch):
    import search.final_stage.retrain as retrain_module

    data = without_test(make_demo(n_train=60, n_val=20, n_test=20, seed=0))
    config = TrialConfig.from_dict({"arch": "convnet", "width": 8, "depth": 2, "lr": 0.01, "batch_size": 32})
    clock = _Clock()
    monkeypatch.setattr(retrain_module, "time", clock)
    # The start reads 1000.25; epoch 1 reads 1000.5 and 1000.75 (0.25 s); before epoch 2, 1001.0 leaves room
    # for one more: the 50-epoch run is re-planned to 2, and its cosine schedule anneals over those 2
    # (epoch 2 starts at half the peak rate, not at 99.9% of it), ending its schedule: not truncated.
    out = retrain(config, data, epochs=50, seed=1, ttas=["none"], deadline=clock.now + 1.25)
    assert not out["stopped_early"] and out["planned_epochs"] == 2 and len(out["history"]) == 2
    assert out["history"][1]["lr"] == pytest.approx(0.5 * 0.01, rel=0.05)
    # No room for a second epoch at all: the run stops mid-schedule, marked.
    cut = retrain(config, data, epochs=50, seed=1, ttas=["none"], deadline=clock.now + 0.9)
    assert cut["stopped_early"] and len(cut["history"]) == 1
    # A run whose turn comes after the deadline trains nothing (it used to train one epoch).
    late = retrain(config, data, epochs=50, seed=1, ttas=["none"], deadline=clock.now - 1)
    assert late["not_started"] and late["history"] == [] and late["state_dict"] is None
    full = retrain(config, data, epochs=2, seed=1, ttas=["none"], deadline=clock.now + 3600)
    assert not full["stopped_early"] and len(full["history"]) == 2

"""Which trials the final stage retrains (`select_candidates`): order, ties, NaN, statuses, top-k, and the config
each is retrained with (typed once; a range-tested trial at the rate it found). No Ray."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from search.final_stage.candidates import SKIPPED_STATUSES, near_copy, retrain_config, select_candidates
from search.tuning.records import TrialRecord
from trainables.config import TrialConfig
from trainables.errors import UserError


def _record(trial_id: str, status: str, objective: float, config: dict, found_lr: float = math.nan) -> TrialRecord:
    nan = math.nan
    return TrialRecord(trial_id=trial_id, status=status, objective=objective, val_acc=objective, epochs=1,
                       seconds=1.0, node_id="n", val_loss=nan, train_loss=nan, train_acc=nan, images_per_s=nan,
                       found_lr=found_lr, error="", config=config)


def test_select_candidates_skips_failures_and_types_configs_once():
    trials = [
        _record("a", "STOPPED", 0.5, {"width": 32.0, "lr": 0.01, "pretrained": False, "augment": "flip_crop"}),
        _record("b", "ERROR", 0.9, {"width": 16}),
        _record("c", "COMPLETED", 0.6, {"width": 48, "augment": "mixup", "family": "convnet"}),
        _record("d", "DIVERGED", 0.95, {"width": 16}),
        _record("e", "RUNNING", math.nan, {"width": 16}),
    ]
    chosen = select_candidates(trials, 5)
    assert [c.trial_id for c in chosen] == ["c", "a"] and [c.name for c in chosen] == ["top1-c", "top2-a"]
    # Keys the space left out take the defaults; Optuna's branching keys (family) are dropped.
    assert chosen[0].config == TrialConfig(width=48, augment="mixup")
    assert type(chosen[1].config.width) is int and chosen[1].config.width == 32  # a 32.0 from a table
    assert chosen[1].config.lr == 0.01 and chosen[1].config.pretrained is False
    assert [c.trial_id for c in select_candidates(trials, 1)] == ["c"]
    assert TrialConfig.from_dict({"soft_labels": "True"}).soft_labels is True
    with pytest.raises(UserError, match="unknown hyperparameter.*'widht'"):
        select_candidates([_record("f", "COMPLETED", 0.7, {"widht": 32})], 1)


def test_a_range_tested_trial_is_retrained_at_the_rate_it_found():
    found = _record("g", "COMPLETED", 0.7, {"lr_mode": "range_test", "optimizer": "adam"}, found_lr=3e-3)
    searched = _record("h", "COMPLETED", 0.6, {"lr_mode": "searched", "lr": 0.02})
    chosen = {c.trial_id: c.config for c in select_candidates([found, searched], 2)}
    assert chosen["g"].lr == 3e-3 and chosen["g"].lr_mode == "searched"  # no second range test
    assert chosen["h"].lr == 0.02 and chosen["h"].lr_mode == "searched"


def test_best_objective_first_and_ties_keep_the_search_order():
    trials = [_record("x", "COMPLETED", 0.7, {}), _record("y", "STOPPED", 0.8, {}),
              _record("z", "COMPLETED", 0.7, {}), _record("w", "STOPPED", 0.7, {})]
    chosen = select_candidates(trials, 4)
    assert [c.trial_id for c in chosen] == ["y", "x", "z", "w"]
    assert [c.rank for c in chosen] == [1, 2, 3, 4]
    assert [c.name for c in chosen] == ["top1-y", "top2-x", "top3-z", "top4-w"]
    assert [c.search_val_acc for c in chosen] == [0.8, 0.7, 0.7, 0.7]
    # Cutting at a tie keeps the earlier trial of the search.
    assert [c.trial_id for c in select_candidates(trials, 2)] == ["y", "x"]


def test_trials_without_a_finite_objective_are_never_chosen():
    trials = [_record("nan", "COMPLETED", math.nan, {}), _record("inf", "COMPLETED", math.inf, {}),
              _record("neg", "COMPLETED", -math.inf, {}), _record("ok", "STOPPED", 0.1, {})]
    assert [c.trial_id for c in select_candidates(trials, 4)] == ["ok"]
    # A search whose every trial is unscored gives no candidate (the final stage then says so).
    assert select_candidates(trials[:3], 3) == []
    assert select_candidates([], 3) == []


def test_top_k_larger_than_the_trials_returns_every_usable_trial_and_zero_returns_none():
    trials = [_record("a", "COMPLETED", 0.4, {}), _record("b", "COMPLETED", 0.6, {})]
    assert [c.trial_id for c in select_candidates(trials, 10)] == ["b", "a"]
    assert select_candidates(trials, 0) == []


@pytest.mark.parametrize("status", ["COMPLETED", "STOPPED", "RUNNING", "PAUSED", "PENDING", "TERMINATED"])
def test_every_status_but_error_and_diverged_counts_once_it_has_an_objective(status):
    # An interrupted search leaves trials RUNNING or PAUSED with epochs already scored: they count.
    assert [c.trial_id for c in select_candidates([_record("t", status, 0.5, {})], 1)] == ["t"]


@pytest.mark.parametrize("status", SKIPPED_STATUSES)
def test_errored_diverged_and_untrained_trials_are_skipped_whatever_their_objective(status):
    assert SKIPPED_STATUSES == ("ERROR", "DIVERGED", "OVER_LATENCY")  # over --max-latency-ms: never trained
    trials = [_record("bad", status, 0.99, {}), _record("good", "COMPLETED", 0.2, {})]
    assert [c.trial_id for c in select_candidates(trials, 2)] == ["good"]


def test_search_val_acc_is_a_plain_float_of_the_objective():
    (cand,) = select_candidates([_record("a", "COMPLETED", np.float32(0.625), {})], 1)
    assert type(cand.search_val_acc) is float and cand.search_val_acc == 0.625
    with pytest.raises(dataclasses.FrozenInstanceError):
        cand.rank = 2


def test_a_range_test_that_found_no_rate_is_retrained_with_a_range_test():
    # The LR range test was skipped (found_lr NaN): there is no rate to fix, so the retraining finds its own.
    skipped = _record("s", "COMPLETED", 0.5, {"lr_mode": "range_test", "lr": 0.02})
    assert retrain_config(skipped) == TrialConfig(lr_mode="range_test", lr=0.02)
    # A searched rate is never replaced by a found_lr a table happens to carry.
    searched = _record("t", "COMPLETED", 0.5, {"lr_mode": "searched", "lr": 0.02}, found_lr=0.5)
    assert retrain_config(searched) == TrialConfig(lr_mode="searched", lr=0.02)
    # The found rate replaces the searched one exactly, and nothing else changes.
    found = _record("u", "COMPLETED", 0.5, {"lr_mode": "range_test", "width": 64, "batch_size": 128},
                    found_lr=np.float64(1.5e-3))
    config = retrain_config(found)
    assert config == TrialConfig(lr_mode="searched", lr=1.5e-3, width=64, batch_size=128)
    assert type(config.lr) is float


RECIPE = {"arch": "convnet", "optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-2, "schedule": "onecycle",
          "warmup_fraction": 0.3, "label_smoothing": 0.1, "batch_size": 128, "augment": "flip_crop"}


def test_near_copies_of_a_better_candidate_are_passed_over_while_the_search_found_something_else():
    # An hour's top 3 used to be the known-good recipe and two TPE refinements of it.
    variant = {**RECIPE, "lr": 2.4e-3, "warmup_fraction": 0.45, "label_smoothing": 0.12}
    other = {**RECIPE, "optimizer": "sgd", "lr": 0.05, "schedule": "cosine"}
    trials = [_record("a", "COMPLETED", 0.60, RECIPE), _record("b", "COMPLETED", 0.59, variant),
              _record("c", "COMPLETED", 0.58, {**variant, "batch_size": 64}),
              _record("d", "COMPLETED", 0.55, other)]
    chosen = select_candidates(trials, 2)
    assert [c.name for c in chosen] == ["top1-a", "top4-d"] and [c.near_copy_of for c in chosen] == ["", ""]
    # Nothing distinct left: the near copies fill the places, best first, and say whose copies they are.
    chosen = select_candidates(trials, 4)
    assert [c.trial_id for c in chosen] == ["a", "d", "b", "c"]
    assert [c.near_copy_of for c in chosen] == ["", "", "a", "a"]  # batch 64 against 128: within the factor


def test_near_copy_compares_choices_exactly_and_numbers_within_a_factor_of_two():
    assert near_copy(RECIPE, {**RECIPE, "lr": 1.6e-3, "weight_decay": 1.9e-2})
    assert not near_copy(RECIPE, {**RECIPE, "lr": 1.4e-3})            # more than a factor 2
    assert not near_copy(RECIPE, {**RECIPE, "augment": "mixup"})      # another choice
    assert not near_copy(RECIPE, {**RECIPE, "label_smoothing": 0.0})  # none against some
    assert not near_copy(RECIPE, {**RECIPE, "pretrained": True})      # a key only one has
    assert not near_copy({"pretrained": False}, {"pretrained": True})
    assert near_copy({"lr": math.nan}, {"lr": math.nan}) and not near_copy({"lr": math.nan}, {"lr": 1e-3})

"""The command line's settings: what --recipe-only sets (search.run.recipe_only), and what it refuses
(search.tuning.settings.check_settings)."""
from __future__ import annotations

import pytest

import search.tuning.warm_start as warm_start
from search.run import SEARCH_FIELDS, recipe_only, what_runs
from search.tuning.settings import parse_settings
from trainables.errors import UserError


def test_recipe_only_runs_the_known_good_configurations_one_epoch_each_and_keeps_the_final_epochs():
    s = recipe_only(parse_settings(["--space", "convnet", "--recipe-only", "--max-epochs", "10", "--num-samples",
                                    "200", "--grace-epochs", "2", "--name", "x"]))
    assert (s.num_samples, s.max_epochs, s.grace_epochs, s.scheduler) == (2, 1, 1, "fifo")
    assert s.final_epochs == 10  # the --max-epochs given, not the one-epoch timing runs'
    assert recipe_only(parse_settings(["--space", "convnet", "--recipe-only", "--final-epochs", "40", "--name", "x"])
                       ).final_epochs == 40
    s = recipe_only(parse_settings(["--space", "all", "--recipe-only", "--name", "x"]))
    assert (s.num_samples, s.final_epochs) == (len(warm_start.KNOWN_GOOD["all"]), 30)
    assert "recipe_only" in SEARCH_FIELDS  # --resume must repeat it


def test_without_recipe_only_the_flags_are_the_users():
    s = parse_settings(["--space", "convnet", "--max-epochs", "10", "--num-samples", "200", "--name", "x"])
    assert (s.recipe_only, s.num_samples, s.max_epochs, s.grace_epochs, s.scheduler) == (False, 200, 10, 2, "asha")


def test_the_search_says_it_is_no_search():
    s = recipe_only(parse_settings(["--space", "convnet", "--recipe-only", "--name", "x"]))
    assert what_runs(s) == ("no search (--recipe-only): its 2 known-good configurations, one epoch each to time "
                            "them for the final stage")
    s = parse_settings(["--space", "convnet", "--max-epochs", "10", "--name", "x"])
    assert what_runs(s) == "32 trials of up to 10 epochs (ASHA at epochs 2, 6), searcher optuna"


@pytest.mark.parametrize("flags, why", [
    (["--no-known-good"], "--recipe-only trains the space's known-good configurations; drop --no-known-good"),
    (["--warm-start", "results/earlier"], "--recipe-only runs no search for --warm-start's trials to seed"),
])
def test_recipe_only_refuses_what_contradicts_it(flags, why):
    with pytest.raises(UserError, match=why):
        parse_settings(["--space", "convnet", "--recipe-only", "--name", "x", *flags])


def test_a_space_without_known_good_configurations_cannot_be_recipe_only(monkeypatch):
    monkeypatch.setitem(warm_start.KNOWN_GOOD, "densenet", [])
    with pytest.raises(UserError, match=r"the space 'densenet' has no known-good configurations for --recipe-only; "
                                        r"choose from \['all', 'convnet', 'resnet'\]"):
        recipe_only(parse_settings(["--space", "densenet", "--recipe-only", "--name", "x"]))

"""What the sampler knows before the first trial (`search.tuning.warm_start`): replaying a config through a space,
the known-good configurations, --warm-start's trials (read from a hand-made experiment, Tune's part faked) and the
Optuna storage they are written to. No Ray; the real CLI is tested in tests/e2e/test_search.py."""
from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import search.tuning.warm_start as warm_start
from search.tuning.records import TrialRecord
from search.tuning.settings import Settings
from search.tuning.study import STUDY_FILE, STUDY_NAME, load_study
from search.tuning.warm_start import KNOWN_GOOD, StudySeed, known_good, prepared_storage, replay, study_seed
from spaces import convnet, get_space, lr_name, with_optuna_names
from tests.helpers import ROOT
from trainables.errors import UserError

GOOD = KNOWN_GOOD["convnet"][0]  # fits the convnet space


def small(trial) -> dict:
    """A branching space: momentum only for SGD."""
    if trial.suggest_categorical("optimizer", ["sgd", "adam"]) == "sgd":
        trial.suggest_float("momentum", 0.5, 0.99)
    trial.suggest_int("depth", 2, 3)
    return {"arch": "convnet"}


def _record(trial_id: str, status: str, objective: float, config: dict) -> TrialRecord:
    return TrialRecord(trial_id=trial_id, status=status, objective=objective, val_acc=objective, epochs=1,
                       config=config)


@pytest.fixture
def earlier(tmp_path, monkeypatch):
    """An earlier experiment `old` (space all, 7 epochs): its settings.json, and `load_trials` faked to return the
    records a test sets in `holder["records"]` (Tune's folder would need Ray to read)."""
    exp = tmp_path / "results" / "old"
    exp.mkdir(parents=True)
    (exp / "settings.json").write_text(Settings(space="all", name="old", max_epochs=7, storage="").to_json())
    holder: dict = {"records": [], "calls": []}

    def fake_load_trials(experiment, max_epochs, storage=""):
        holder["calls"].append((Path(experiment), max_epochs, storage))
        return holder["records"]

    monkeypatch.setattr(warm_start, "load_trials", fake_load_trials)
    holder["exp"] = exp
    return holder


def _seed(exp: Path, *, known: bool = False) -> StudySeed:
    return study_seed("convnet", ferplus=False, offer_weights=False, warm_start=str(exp), use_known_good=known)


# --------------------------------------------------------------------------- replay and known-good

def test_replay_keeps_what_the_space_draws_and_ignores_the_rest():
    params, distributions = replay(small, {"optimizer": "adam", "depth": 2, "momentum": 0.9, "arch": "convnet"})
    assert params == {"optimizer": "adam", "depth": 2}  # momentum is not drawn for Adam; arch is a constant
    assert set(distributions) == {"optimizer", "depth"}
    assert distributions["depth"] == optuna.distributions.IntDistribution(2, 3)
    params, _ = replay(small, {"optimizer": "sgd", "momentum": 0.9, "depth": 3})
    assert params == {"optimizer": "sgd", "momentum": 0.9, "depth": 3}


@pytest.mark.parametrize("config, why", [
    ({"optimizer": "sgd", "depth": 2}, "'momentum' is not found"),           # a parameter the config lacks
    ({"optimizer": "rmsprop", "depth": 2}, "'rmsprop' not in"),              # a choice the space lacks
    ({"optimizer": "adam", "depth": 4}, "value 4 of parameter 'depth'"),     # outside the range
    ({"optimizer": "sgd", "momentum": 0.1, "depth": 2}, "parameter 'momentum'"),
])
def test_replay_refuses_a_config_that_does_not_fit_the_space(config, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        replay(small, config)


@pytest.mark.parametrize("space_name", sorted(KNOWN_GOOD))
@pytest.mark.parametrize("ferplus, offer_weights", [(False, False), (True, True)])
def test_every_known_good_configuration_fits_its_space_as_written(space_name, ferplus, offer_weights):
    space = partial(get_space(space_name), ferplus=ferplus, offer_weights=offer_weights)
    configs = known_good(space_name, space)
    assert len(configs) == len(KNOWN_GOOD[space_name]) >= 1
    for params, written in zip(configs, KNOWN_GOOD[space_name]):
        as_written = with_optuna_names(written)  # `lr` and `weight_decay` also under the optimizer's own names
        assert params == {k: as_written[k] for k in params}  # every value the space draws, exactly as written
        assert params["lr_mode"] == "searched" and params[lr_name(written["optimizer"])] == written["lr"]
        # Weights and FER+ votes are declined where the space offers them.
        assert params.get("pretrained", False) is False and params.get("soft_labels", False) is False
        assert ("soft_labels" in params) == ferplus


def test_a_space_without_known_good_configurations_has_none():
    assert known_good("small", small) == []
    assert [c["family"] for c in KNOWN_GOOD["all"]] == ["convnet", "convnet", "resnet", "resnet"]


# --------------------------------------------------------------------------- study_seed

def test_study_seed_without_warm_start_enqueues_the_known_good_configurations_first():
    seed = study_seed("convnet", ferplus=False, offer_weights=False, warm_start="", use_known_good=True)
    assert seed.trials == []
    assert seed.enqueued == known_good("convnet", partial(convnet, ferplus=False, offer_weights=False))
    assert [p["width"] for p in seed.enqueued] == [64, 32]
    (note,) = seed.notes
    assert note.startswith("known-good: the first 2 trials are this space's known-good configurations")
    assert "--no-known-good" in note
    assert study_seed("convnet", ferplus=False, offer_weights=False, warm_start="",
                      use_known_good=False) == StudySeed()


def test_the_known_good_note_names_a_file_that_exists():
    (note,) = study_seed("convnet", ferplus=False, offer_weights=False, warm_start="", use_known_good=True).notes
    (path,) = re.findall(r"\((\S+\.py) says where each comes from", note)
    assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_a_folder_that_is_not_an_experiment_is_a_one_line_user_error(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        _seed(tmp_path / folder)
    message = str(err.value)
    assert message == (f"--warm-start {tmp_path / folder} is not an experiment folder (no settings.json); "
                       f"pass results/<name>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing was written


def test_warm_start_keeps_the_finished_trials_that_fit_and_says_how_many(earlier):
    exp = earlier["exp"]
    earlier["records"] = [
        _record("a", "COMPLETED", 0.6, {**GOOD, "family": "convnet"}),
        _record("d", "ERROR", 0.9, GOOD),                  # failed: not a result
        _record("e", "RUNNING", 0.8, GOOD),                # unfinished: its objective may still change
        _record("p", "PAUSED", 0.75, GOOD),
        _record("w", "PENDING", 0.7, GOOD),
        _record("h", "STOPPED", 0.5, {**GOOD, "width": 100}),  # a width the convnet space does not offer
        _record("b", "STOPPED", 0.4, {**GOOD, "dropout": 0.1}),
        _record("m", "COMPLETED", 0.35, {"width": 64}),    # lacks most of the space's parameters
        _record("c", "DIVERGED", 0.3, GOOD),               # its objective is the model it diverged to
        _record("n", "COMPLETED", math.nan, GOOD),         # never reported
    ]
    seed = _seed(exp, known=True)
    # The earlier experiment is read with its own settings (7 epochs, its own storage).
    assert earlier["calls"] == [(exp, 7, "")]
    assert [t.user_attrs["warm_start"] for t in seed.trials] == ["old/a", "old/b", "old/c"]
    assert [t.value for t in seed.trials] == [0.6, 0.4, 0.3]
    assert all(t.state == TrialState.COMPLETE for t in seed.trials)
    good = with_optuna_names(GOOD)
    assert seed.trials[1].params == {k: (0.1 if k == "dropout" else good[k]) for k in seed.trials[1].params}
    assert "family" not in seed.trials[0].params  # the convnet space draws no family
    assert seed.notes[0] == (
        f"warm start: 3 of 5 finished trials of {exp} (space all) seed the sampler; 2 do not fit the space "
        f"'convnet' and are left out (e.g. '100' not in (16, 32, 48, 64).)")
    assert seed.notes[1].startswith("known-good: the first 2 trials")
    assert len(seed.enqueued) == 2
    # With --no-known-good: only the warm start's line, and nothing enqueued.
    assert len(_seed(exp).notes) == 1 and _seed(exp).enqueued == []


def test_a_warm_start_whose_trials_all_fit_says_nothing_is_left_out(earlier):
    earlier["records"] = [_record("a", "COMPLETED", 0.6, GOOD)]
    (note,) = _seed(earlier["exp"]).notes
    assert note == f"warm start: 1 of 1 finished trials of {earlier['exp']} (space all) seed the sampler"


def test_a_warm_start_none_of_whose_trials_fits_is_a_one_line_user_error(earlier):
    earlier["records"] = [_record("m", "COMPLETED", 0.35, {"width": 64}), _record("h", "STOPPED", 0.5, {
        **GOOD, "width": 100}), _record("d", "ERROR", 0.9, GOOD)]
    with pytest.raises(UserError) as err:
        _seed(earlier["exp"])
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"--warm-start {earlier['exp']}: none of its 2 finished trials fits the space 'convnet' "
                       f"(e.g. The value of the parameter 'depth' is not found. Please set it at the construction "
                       f"of the FixedTrial object.)")


@pytest.mark.parametrize("statuses", [[], ["ERROR", "RUNNING"]])
def test_a_warm_start_without_a_finished_trial_is_a_user_error(earlier, statuses):
    earlier["records"] = [_record(f"t{i}", s, 0.5, GOOD) for i, s in enumerate(statuses)]
    with pytest.raises(UserError, match=re.escape(f"--warm-start {earlier['exp']}: the experiment has no "
                                                  f"finished trial")):
        _seed(earlier["exp"])


# --------------------------------------------------------------------------- prepared_storage

def _earlier_trial(value: float, depth: int):
    params, distributions = replay(small, {"optimizer": "adam", "depth": depth})
    return optuna.trial.create_trial(params=params, distributions=distributions, value=value,
                                     user_attrs={"warm_start": f"old/{depth}"})


def test_prepared_storage_holds_the_earlier_trials_and_runs_the_known_good_ones_first(tmp_path):
    exp = tmp_path / "results" / "new"  # created with the storage
    enqueued = [{"optimizer": "sgd", "momentum": 0.9, "depth": 3}, {"optimizer": "adam", "depth": 2}]
    storage = prepared_storage(exp, StudySeed(trials=[_earlier_trial(0.6, 2), _earlier_trial(0.4, 3)],
                                              enqueued=enqueued))
    on_disk = load_study(exp)
    assert (exp / STUDY_FILE).is_file() and on_disk.direction == optuna.study.StudyDirection.MAXIMIZE
    assert [(t.state, t.value, t.user_attrs.get("warm_start")) for t in on_disk.trials] == [
        (TrialState.COMPLETE, 0.6, "old/2"), (TrialState.COMPLETE, 0.4, "old/3"),
        (TrialState.WAITING, None, None), (TrialState.WAITING, None, None)]
    # The sampler's study (what Ray's OptunaSearch loads) gives the known-good configurations first, in order.
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    for want in enqueued:
        trial = study.ask()
        small(trial)
        assert trial.params == want
    assert [t.state for t in load_study(exp).trials][2:] == [TrialState.RUNNING, TrialState.RUNNING]


def test_preparing_the_storage_again_replaces_the_study_of_a_start_that_never_ran_a_trial(tmp_path):
    exp = tmp_path / "new"
    prepared_storage(exp, StudySeed(trials=[_earlier_trial(0.6, 2)], enqueued=[{"optimizer": "adam", "depth": 2}]))
    prepared_storage(exp, StudySeed(trials=[_earlier_trial(0.1, 3)]), direction="minimize")
    on_disk = load_study(exp)
    assert [(t.state, t.value) for t in on_disk.trials] == [(TrialState.COMPLETE, 0.1)]
    assert on_disk.direction == optuna.study.StudyDirection.MINIMIZE


@pytest.mark.parametrize("change, why", [
    ({"labels": "ferplus"}, "scored on fer2013 labels and this search uses ferplus"),
    ({"data": "demo"}, "trained on --data data/fer2013.csv, this search on demo"),
])
def test_warm_start_refuses_an_experiment_of_other_labels_or_data(earlier, change, why):
    earlier["records"] = [_record("a", "COMPLETED", 0.6, GOOD)]
    current = Settings(space="convnet", name="new", max_epochs=7, **change)
    with pytest.raises(UserError, match=re.escape(why)):
        study_seed("convnet", ferplus=False, offer_weights=False, warm_start=str(earlier["exp"]),
                   use_known_good=False, current=current)


def test_warm_start_from_another_fidelity_says_its_values_are_a_prior(earlier):
    earlier["records"] = [_record("a", "COMPLETED", 0.6, GOOD)]
    same = Settings(space="convnet", name="new", max_epochs=7)
    seed = study_seed("convnet", ferplus=False, offer_weights=False, warm_start=str(earlier["exp"]),
                      use_known_good=False, current=same)
    assert len(seed.trials) == 1 and "fidelity" not in seed.notes[0]
    other = Settings(space="convnet", name="new", max_epochs=20, train_fraction=0.3)
    seed = study_seed("convnet", ferplus=False, offer_weights=False, warm_start=str(earlier["exp"]),
                      use_known_good=False, current=other)
    assert "at another fidelity: --train-fraction 1 and --max-epochs 7 there, 0.3 and 20 here" in seed.notes[0]

"""The search's Optuna study on disk (`search.tuning.study`): the in-memory study mirrored to `optuna.db`, a pickled
copy (Tune's snapshot) rebuilding it on resume, a refused write, and `settle_finished`. Optuna directly, no Ray."""
from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

import search.tuning.study as study_module
from search.tuning.records import TrialRecord
from search.tuning.study import (
    STUDY_FILE,
    STUDY_NAME,
    TRIAL_ATTR,
    MirroredStorage,
    load_study,
    open_storage,
    resume_into,
    resumed_url,
    settle_finished,
    study_url,
)


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(storage) -> optuna.Study:
    return optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize")


def _finish(study: optuna.Study, x: int, value: float, tune_id: str = "") -> optuna.Trial:
    """A trial drawing `x`, labelled `tune_id`, told `value` (left running for NaN)."""
    study.enqueue_trial({"x": x})
    trial = study.ask()
    assert trial.suggest_int("x", 0, 10) == x
    if tune_id:
        trial.set_user_attr(TRIAL_ATTR, tune_id)
    if not math.isnan(value):
        study.tell(trial, value)
    return trial


def _view(trials) -> list[tuple]:
    """What the dashboard and the report see of each trial."""
    return [(t.number, t.state, t.value, t.params, t.distributions, t.intermediate_values, t.user_attrs)
            for t in sorted(trials, key=lambda t: t.number)]


def _record(trial_id: str, status: str, objective: float) -> TrialRecord:
    return TrialRecord(trial_id=trial_id, status=status, objective=objective, val_acc=objective, epochs=1)


def test_the_study_lives_in_the_experiment_folder_at_an_absolute_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TRIAL_ATTR == "tune_trial_id" and STUDY_FILE == "optuna.db"
    assert study_url(Path("results/x")) == f"sqlite:///{tmp_path.resolve()}/results/x/optuna.db"
    storage = open_storage(Path("results/x"))  # the folder is created with it
    assert isinstance(storage, MirroredStorage) and (tmp_path / "results" / "x" / STUDY_FILE).is_file()


def test_every_write_to_the_study_is_mirrored_to_optuna_db(tmp_path):
    study = _study(open_storage(tmp_path))
    study.set_user_attr("space", "convnet")
    trial = study.ask()
    trial.suggest_categorical("optimizer", ["sgd", "adam"])
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trial.set_user_attr(TRIAL_ATTR, "abc_00000")
    trial.report(0.3, 1)
    trial.report(0.5, 2)
    study.tell(trial, 0.5)
    failed = study.ask()
    failed.suggest_int("x", 0, 10)
    study.tell(failed, state=TrialState.FAIL)
    pruned = study.ask()
    pruned.report(0.1, 1)
    study.tell(pruned, state=TrialState.PRUNED)
    running = study.ask()
    running.set_user_attr(TRIAL_ATTR, "abc_00003")
    study.enqueue_trial({"x": 4})
    study.add_trial(optuna.trial.create_trial(params={"x": 2}, distributions={
        "x": optuna.distributions.IntDistribution(0, 10)}, value=0.25, user_attrs={"warm_start": "old/t1"}))

    on_disk = load_study(tmp_path)
    assert _view(on_disk.trials) == _view(study.trials)
    assert [t.state for t in on_disk.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED,
                                                  TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE]
    assert on_disk.trials[0].user_attrs == {TRIAL_ATTR: "abc_00000"}
    assert on_disk.trials[0].intermediate_values == {1: 0.3, 2: 0.5}
    assert on_disk.user_attrs == {"space": "convnet"}
    assert on_disk.best_value == 0.5 and on_disk.direction == optuna.study.StudyDirection.MAXIMIZE
    # The enqueued trial runs next, in memory and on disk alike.
    nxt = study.ask()
    assert nxt.suggest_int("x", 0, 10) == 4
    assert load_study(tmp_path).trials[4].state == TrialState.RUNNING


def test_a_pickled_copy_writes_nothing_until_attached_and_then_rebuilds_the_database(tmp_path, caplog):
    """The resume Tune's snapshots make: the search is killed after a trial ended but before the next snapshot."""
    storage = open_storage(tmp_path)
    study = _study(storage)
    _finish(study, 1, 0.4, "t0")
    second = _finish(study, 2, math.nan, "t1")  # running when Tune saved the searcher
    snapshot = pickle.dumps(storage)
    study.tell(second, 0.7)  # ended, in optuna.db, but not in the snapshot
    assert load_study(tmp_path).trials[1].state == TrialState.COMPLETE

    restored = pickle.loads(snapshot)
    again = optuna.load_study(study_name=STUDY_NAME, storage=restored)
    assert again.trials[1].state == TrialState.RUNNING  # the copy is the snapshot
    again.set_user_attr("written", "before attach")
    assert "written" not in load_study(tmp_path).user_attrs  # detached: the file is left as it was

    restored.attach()
    on_disk = load_study(tmp_path)
    assert _view(on_disk.trials) == _view(again.trials) and on_disk.user_attrs == {"written": "before attach"}
    # The re-run trial can report its result: Optuna would refuse it had the file kept the finished copy.
    with caplog.at_level(logging.WARNING, logger=study_module.__name__):
        again.tell(1, 0.8)
    assert not caplog.records
    assert [(t.state, t.value) for t in load_study(tmp_path).trials] == [
        (TrialState.COMPLETE, 0.4), (TrialState.COMPLETE, 0.8)]


def test_a_resumed_study_is_mirrored_to_the_folder_the_command_runs_in(tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "_resumed_url", None)  # as in a fresh process
    assert resumed_url() is None
    old, new = tmp_path / "cluster" / "x", tmp_path / "copied-back" / "x"
    storage = open_storage(old)
    _finish(_study(storage), 3, 0.6, "t0")
    new.mkdir(parents=True)  # the experiment folder, copied elsewhere, then --resume

    resume_into(new)
    assert resumed_url() == study_url(new) and resumed_url().endswith("/copied-back/x/optuna.db")
    restored = pickle.loads(pickle.dumps(storage))
    restored.attach(resumed_url())
    _finish(optuna.load_study(study_name=STUDY_NAME, storage=restored), 4, 0.9, "t1")
    assert [t.value for t in load_study(new).trials] == [0.6, 0.9]
    assert [t.value for t in load_study(old).trials] == [0.6]  # the old copy is no longer written


def test_a_write_the_database_refuses_stops_the_mirror_with_one_warning_and_the_search_goes_on(tmp_path, caplog):
    study = _study(open_storage(tmp_path))
    _finish(study, 1, 0.4)
    db = RDBStorage(study_url(tmp_path))  # the file is changed behind the search's back
    for s in db.get_all_studies():
        db.delete_study(s._study_id)
    with caplog.at_level(logging.WARNING, logger=study_module.__name__):
        _finish(study, 2, 0.5)
        _finish(study, 3, 0.6)
    (warning,) = [r for r in caplog.records if r.name == study_module.__name__]
    assert warning.levelno == logging.WARNING
    assert f"{study_url(tmp_path)} is no longer updated" in warning.getMessage()
    assert "the search goes on" in warning.getMessage()
    assert [t.value for t in study.trials] == [0.4, 0.5, 0.6]  # the study in memory is whole


def test_creating_the_study_replaces_one_an_earlier_attempt_left_in_the_file(tmp_path):
    url = study_url(tmp_path)
    leftover = optuna.create_study(storage=url, study_name=STUDY_NAME)
    leftover.enqueue_trial({"x": 1})
    optuna.create_study(storage=url, study_name="other").enqueue_trial({"x": 2})
    _finish(_study(open_storage(tmp_path)), 5, 0.5)
    assert [(t.params, t.value) for t in load_study(tmp_path).trials] == [({"x": 5}, 0.5)]
    assert len(optuna.load_study(study_name="other", storage=url).trials) == 1  # another study is left alone


# --------------------------------------------------------------------------- settle_finished and load_study

def test_settle_finished_tells_the_study_how_trials_ended_that_tune_stopped(tmp_path):
    study = _study(open_storage(tmp_path))
    for tune_id in ["stopped", "error", "early", "running", "paused", "pending", "unknown", "diverged"]:
        _finish(study, 1, math.nan, tune_id)
    _finish(study, 2, math.nan)  # a trial the searcher never labelled
    _finish(study, 3, 0.45, "done")  # finished through the searcher: left as it is
    records = [_record("stopped", "STOPPED", 0.6), _record("error", "ERROR", 0.5),
               _record("early", "STOPPED", math.nan), _record("running", "RUNNING", 0.7),
               _record("paused", "PAUSED", 0.7), _record("pending", "PENDING", math.nan),
               _record("diverged", "DIVERGED", 0.3), _record("done", "COMPLETED", 0.9)]

    assert settle_finished(tmp_path, records) == 4
    got = {t.user_attrs.get(TRIAL_ATTR, "-"): (t.state, t.value) for t in load_study(tmp_path).trials}
    assert got == {
        "stopped": (TrialState.COMPLETE, 0.6), "error": (TrialState.FAIL, None), "early": (TrialState.PRUNED, None),
        "running": (TrialState.RUNNING, None), "paused": (TrialState.RUNNING, None),
        "pending": (TrialState.RUNNING, None), "unknown": (TrialState.RUNNING, None),
        "diverged": (TrialState.COMPLETE, 0.3), "-": (TrialState.RUNNING, None), "done": (TrialState.COMPLETE, 0.45)}
    assert settle_finished(tmp_path, records) == 0  # nothing left to settle


def test_settle_finished_and_load_study_without_a_study(tmp_path):
    # An experiment run before optuna.db existed: nothing to settle, and no file is created.
    assert settle_finished(tmp_path, [_record("t", "STOPPED", 0.5)]) == 0
    assert load_study(tmp_path) is None and not (tmp_path / STUDY_FILE).exists()
    # The file exists but the search stopped before creating the study.
    open_storage(tmp_path)
    assert (tmp_path / STUDY_FILE).is_file()
    assert load_study(tmp_path) is None
    assert settle_finished(tmp_path, [_record("t", "STOPPED", 0.5)]) == 0


def test_optuna_db_is_rebuilt_from_the_snapshot_a_resume_restores(tmp_path):
    """A kill after a trial ended in optuna.db but before Tune's snapshot: the restored snapshot has it running,
    Tune runs it again, and the database must take its new result (Optuna refuses to update a finished trial)."""
    storage = open_storage(tmp_path)
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize")
    first = study.ask()
    first.suggest_float("lr", 1e-4, 1e-1, log=True)
    first.report(0.3, 1)
    snapshot = pickle.dumps(study)  # Tune's snapshot: the trial is still running
    study.tell(first, 0.4)
    study.tell(study.ask(), 0.1)  # handed out and finished after the snapshot: Tune never knew of it
    assert [t.state.name for t in load_study(tmp_path).trials] == ["COMPLETE", "COMPLETE"]

    restored = pickle.loads(snapshot)
    restored._storage.attach()  # what TrackedOptunaSearch.restore does
    assert [t.state.name for t in load_study(tmp_path).trials] == ["RUNNING"]
    moved = tmp_path / "moved"  # the experiment copied elsewhere, then resumed there
    moved.mkdir()
    restored._storage.attach(study_url(moved))
    again = optuna.Trial(restored, restored._storage.get_trial_id_from_study_id_trial_number(restored._study_id, 0))
    again.report(0.35, 2)
    restored.tell(again, 0.45)
    assert [t.state.name for t in load_study(tmp_path).trials] == ["RUNNING"]  # the old place is left alone
    (on_disk,) = load_study(moved).trials
    assert on_disk.value == 0.45 and on_disk.intermediate_values == {1: 0.3, 2: 0.35} and "lr" in on_disk.params


def test_tpe_learns_the_latency_limit_as_a_constraint():
    """A toy study where accuracy and latency both grow with x: unconstrained TPE climbs to x near 1; with
    --max-latency-ms 0.4 (latency = x), its proposals after the start-up stay mostly under the limit."""
    import optuna

    from search.run import tpe_sampler
    from search.tuning.callbacks import LATENCY_ATTR, latency_constraint

    def proposals(limit: float) -> list[float]:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=tpe_sampler(0, 8, limit))
        xs = []
        for _ in range(40):
            trial = study.ask()
            x = trial.suggest_float("x", 0.0, 1.0)
            trial.set_user_attr(LATENCY_ATTR, x)  # as TrackedOptunaSearch does, before the tell
            study.tell(trial, 0.0 if limit and x > limit else x)
            xs.append(x)
        return xs[8:]

    free, limited = proposals(0.0), proposals(0.4)
    under = [sum(x <= 0.4 for x in xs) for xs in (free, limited)]
    assert sum(x > 0.4 for x in free) > 20  # unconstrained, TPE climbs past the limit
    assert under[1] >= 0.6 * len(limited) and under[1] >= under[0] + 8  # constrained, it mostly stays under
    assert latency_constraint(0.4)(optuna.trial.FrozenTrial(
        number=0, state=optuna.trial.TrialState.COMPLETE, value=0.1, datetime_start=None, datetime_complete=None,
        params={}, distributions={}, user_attrs={LATENCY_ATTR: 0.9}, system_attrs={}, intermediate_values={},
        trial_id=0)) == [pytest.approx(0.5)]

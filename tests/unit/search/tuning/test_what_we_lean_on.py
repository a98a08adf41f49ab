"""The private parts of Ray and Optuna the search relies on still exist, with the shape it expects.

Each failure here means a dependency upgrade changed something the code patches or reads
(pyproject.toml bounds those packages to the versions tested): fix the code, then the bound.
"""
from __future__ import annotations

import inspect
import logging


def test_the_patched_ray_method_exists_and_is_patched():
    from ray.air.execution._internal import actor_manager

    from search.tuning.cluster import tolerate_lost_workers

    target = getattr(actor_manager.RayActorManager, "_actor_task_failed", None)
    assert target is not None, "Ray renamed RayActorManager._actor_task_failed: tolerate_lost_workers patches nothing"
    params = list(inspect.signature(target).parameters)
    assert params[:3] == ["self", "tracked_actor_task", "exception"], params
    tolerate_lost_workers()
    patched = actor_manager.RayActorManager._actor_task_failed
    assert getattr(patched, "tolerates_lost_workers", False)
    tolerate_lost_workers()  # a second call keeps the one patch, not a wrapper of it
    assert actor_manager.RayActorManager._actor_task_failed is patched


def test_optuna_search_keeps_the_attributes_the_tracked_search_reads(tmp_path):
    from ray import tune

    from search.tuning.callbacks import TrackedOptunaSearch

    searcher = TrackedOptunaSearch(space={"x": tune.uniform(0.0, 1.0)}, metric="m", mode="max",
                                   storage=None, study_name="s")
    for name in ("_ot_trials", "_completed_trials", "_storage", "metric"):
        assert hasattr(searcher, name), f"ray's OptunaSearch no longer has {name}"
    assert isinstance(searcher._ot_trials, dict) and isinstance(searcher._completed_trials, set)
    for method in ("suggest", "on_trial_complete", "restore"):
        assert method in vars(type(searcher).__mro__[1]), f"OptunaSearch.{method} is gone"


def test_tune_experiment_state_file_name():
    """search.tuning.storage.tune_started recognises a search by Tune's experiment_state-*.json."""
    from ray.tune.execution.tune_controller import TuneController

    assert TuneController.CKPT_FILE_TMPL.startswith("experiment_state-")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_ray_token_auth_warning_goes_through_the_silenced_logger(monkeypatch):
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")  # put back as it was after the test (ray_quiet sets it)
    import ray._private.authentication.authentication_token_setup as setup

    from search.tuning.console import RAY_AUTH_LOGGER, ray_quiet

    assert setup.logger.name == RAY_AUTH_LOGGER
    assert callable(getattr(setup, "_warn_token_auth_enabled", None))
    seen = _Collect()
    setup.logger.addHandler(seen)
    try:
        assert ray_quiet(verbose=False) == {"log_to_driver": False}
        setup._warn_token_auth_enabled()
        assert not seen.messages
        assert ray_quiet(verbose=True) == {"log_to_driver": True}
        setup._warn_token_auth_enabled()
        assert any("Token authentication is enabled" in m for m in seen.messages)
    finally:
        setup.logger.removeHandler(seen)
        logging.getLogger(RAY_AUTH_LOGGER).setLevel(logging.NOTSET)


def test_quiet_runs_take_tunes_older_console_output_which_is_silent_at_verbosity_0(monkeypatch):
    from ray.tune.experimental.output import AirVerbosity, get_air_verbosity

    from search.tuning.console import ray_quiet

    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")  # Tune's default; put back as it was after the test
    assert get_air_verbosity(0) == AirVerbosity.SILENT  # the newer output, which prints its box even so
    ray_quiet(verbose=True)
    assert get_air_verbosity(1) is not None  # --verbose: Tune's tables, as Tune draws them by default
    ray_quiet(verbose=False)
    assert get_air_verbosity(0) is None  # the older reporter: tune.run prints at Verbosity.V1 and up only


def test_a_retried_trial_keeps_the_result_rows_its_loggers_would_restore_stale(tmp_path):
    # Tune's loggers start a retried trial's result.json again from the experiment's copy, which lags the
    # driver's staging folder until Tune syncs it; TrialLogsKept copies the staging file over first.
    from types import SimpleNamespace

    import pyarrow.fs
    from ray.tune.logger.json import JsonLoggerCallback

    from search.tuning.callbacks import TrialLogsKept

    staging, experiment = tmp_path / "staging", tmp_path / "experiment"
    staging.mkdir()
    experiment.mkdir()
    rows = '{"epoch": 1}\n{"epoch": 2}\n'
    trial = SimpleNamespace(local_path=str(staging), checkpoint=object(), storage=SimpleNamespace(
        trial_fs_path=str(experiment / "trial_a"), storage_filesystem=pyarrow.fs.LocalFileSystem()))
    (staging / "result.json").write_text(rows)
    (experiment / "trial_a").mkdir()
    (experiment / "trial_a" / "result.json").write_text('{"epoch": 1}\n')  # the last sync's copy
    assert hasattr(JsonLoggerCallback, "_restore_from_remote"), "Tune's loggers no longer restore from the experiment"
    JsonLoggerCallback()._restore_from_remote("result.json", trial)
    assert (staging / "result.json").read_text() == '{"epoch": 1}\n'  # what a retry started from without the copy

    (staging / "result.json").write_text(rows)
    TrialLogsKept().on_trial_recover(0, [], trial)
    JsonLoggerCallback()._restore_from_remote("result.json", trial)
    assert (staging / "result.json").read_text() == rows
    assert not (experiment / "trial_a" / "progress.csv").exists()  # only the files the trial has are copied
    trial.storage.trial_fs_path = str(staging)  # staging is the experiment (storage on the driver's disk)
    TrialLogsKept().on_trial_recover(0, [], trial)
    assert (staging / "result.json").read_text() == rows

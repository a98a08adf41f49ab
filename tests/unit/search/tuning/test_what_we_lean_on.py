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


def test_ray_token_auth_warning_goes_through_the_silenced_logger():
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

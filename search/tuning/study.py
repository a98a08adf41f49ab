"""The search's Optuna study on disk: `results/<name>/optuna.db`, written while the search runs.

`optuna-dashboard sqlite:///results/<name>/optuna.db` shows a search live, the study stays
with the experiment (copied back from a cluster with it) and `search.report` reads it
afterwards. Each Optuna trial carries its Tune trial id (user attribute `tune_trial_id`),
the key of `trials.csv`.

Why a mirror rather than handing Ray's `OptunaSearch` an `RDBStorage` directly: Tune saves
the searcher with its experiment snapshot every ~10 s, and `--resume` continues from that
snapshot. With the study only in SQLite, a search killed between a trial's end and the next
snapshot comes back with that trial finished in the database while Tune runs it again, and
Optuna refuses to report to a finished trial (measured: `UpdateFinishedTrialError` on
resume). So the storage `OptunaSearch` takes is `MirroredStorage`: Optuna's in-memory
storage, saved with Tune's snapshot as before, with every write repeated into SQLite; when
Tune restores the searcher, the database is rebuilt from the restored snapshot, so the two
never disagree. SQLite is enough: only the driver writes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

from optuna.storages import InMemoryStorage

STUDY_NAME = "optuna"    # the name Ray's OptunaSearch gives its study
STUDY_FILE = "optuna.db"
TRIAL_ATTR = "tune_trial_id"
log = logging.getLogger(__name__)
# Where a restored study is mirrored: the running command's experiment folder, which may not be
# where the snapshot was taken (a folder copied back from a cluster, then --resume).
_resumed_url: str | None = None


def resume_into(experiment_dir: Path) -> None:
    """Mirror a study restored by this process (--resume) into `experiment_dir`'s optuna.db."""
    global _resumed_url
    _resumed_url = study_url(experiment_dir)


def resumed_url() -> str | None:
    """The optuna.db a study restored by this process is mirrored to (`resume_into`), if set."""
    return _resumed_url


def study_url(experiment_dir: Path) -> str:
    """The SQLAlchemy URL of the experiment's study (an absolute path: a resumed search may run elsewhere)."""
    return f"sqlite:///{(Path(experiment_dir) / STUDY_FILE).resolve()}"


class MirroredStorage(InMemoryStorage):
    """Optuna's in-memory storage whose every write is repeated into an SQLite file (see the module's docstring).

    Reads are served from memory. A copy made by pickling (Tune's snapshots, tests reading
    them) is detached: it writes nothing until `attach()` rebuilds the file from it. A write
    the database refuses (a full disk) stops the mirror with one warning; the search goes on.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url
        self._db = None
        self._ids: dict[str, dict[int, int]] = {"study": {}, "trial": {}}
        self.attach()

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state["_db"] = None
        return state

    def attach(self, url: str | None = None) -> None:
        """(Re)write the SQLite study (at `url`, default where it was) from memory and mirror every later write."""
        from optuna.storages import RDBStorage

        self._url = url or self._url
        db = RDBStorage(self._url)
        _drop_studies(db, {s.study_name for s in self.get_all_studies()})
        self._ids = {"study": {}, "trial": {}}
        for study in self.get_all_studies():
            sid = db.create_new_study(study.directions, study.study_name)
            self._ids["study"][study._study_id] = sid
            for key, value in study.user_attrs.items():
                db.set_study_user_attr(sid, key, value)
            for key, value in study.system_attrs.items():
                db.set_study_system_attr(sid, key, value)
            for t in self.get_all_trials(study._study_id, deepcopy=False):
                self._ids["trial"][t._trial_id] = db.create_new_trial(sid, template_trial=t)
        self._db = db

    def _mirror(self, method: str, kind: str, own_id: int, *args, **kwargs):
        """The database's `method` on the database's id for our `own_id` (a study or a trial); its result,
        or None when the mirror is detached or stops here."""
        if self._db is None:
            return None
        try:
            return getattr(self._db, method)(self._ids[kind][own_id], *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the file is a view; the search must not fail on it
            log.warning("%s is no longer updated (%s: %s); the search goes on", self._url, type(err).__name__, err)
            self._db = None
            return None

    # Writes: done in memory, then repeated in the database under its own ids.
    def create_new_study(self, directions, study_name: str | None = None) -> int:
        sid = super().create_new_study(directions, study_name)
        if self._db is not None:
            name = self.get_study_name_from_id(sid)
            _drop_studies(self._db, {name})  # left by an attempt that never ran a trial
            self._ids["study"][sid] = self._db.create_new_study(directions, name)
        return sid

    def delete_study(self, study_id: int) -> None:
        super().delete_study(study_id)
        self._mirror("delete_study", "study", study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        super().set_study_user_attr(study_id, key, value)
        self._mirror("set_study_user_attr", "study", study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        super().set_study_system_attr(study_id, key, value)
        self._mirror("set_study_system_attr", "study", study_id, key, value)

    def create_new_trial(self, study_id: int, template_trial=None) -> int:
        tid = super().create_new_trial(study_id, template_trial)
        if self._db is not None:
            db_tid = self._mirror("create_new_trial", "study", study_id, template_trial=self.get_trial(tid))
            if db_tid is not None:
                self._ids["trial"][tid] = db_tid
        return tid

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution) -> None:
        super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
        self._mirror("set_trial_param", "trial", trial_id, param_name, param_value_internal, distribution)

    def set_trial_state_values(self, trial_id: int, state, values=None) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if changed:
            self._mirror("set_trial_state_values", "trial", trial_id, state, values)
        return changed

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        super().set_trial_intermediate_value(trial_id, step, intermediate_value)
        self._mirror("set_trial_intermediate_value", "trial", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        super().set_trial_user_attr(trial_id, key, value)
        self._mirror("set_trial_user_attr", "trial", trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        super().set_trial_system_attr(trial_id, key, value)
        self._mirror("set_trial_system_attr", "trial", trial_id, key, value)


def _drop_studies(db, names: set[str]) -> None:
    """Delete the studies called `names` from the database `db` (an earlier copy of a study being rewritten)."""
    for old in db.get_all_studies():
        if old.study_name in names:
            db.delete_study(old._study_id)


def open_storage(experiment_dir: Path) -> MirroredStorage:
    """The storage Ray's OptunaSearch is given: in memory, mirrored to `optuna.db` (created with its folder)."""
    Path(experiment_dir).mkdir(parents=True, exist_ok=True)
    return MirroredStorage(study_url(experiment_dir))


def settle_finished(experiment_dir: Path, records: Iterable) -> int:
    """Tell `optuna.db` how the trials Tune ended without telling the searcher finished; returns how many.

    When --time-budget (or any stopper) ends the experiment, Tune stops the running trials
    without calling the searcher, so they would stay RUNNING in the study while `trials.csv`
    has them STOPPED with an objective. Each gets its `trials.csv` objective (an ERROR: failed;
    one stopped before its first epoch: pruned); trials left unfinished for --resume stay running.
    """
    import math

    from optuna.trial import TrialState

    from search.tuning.records import UNFINISHED

    study = load_study(experiment_dir)
    if study is None:
        return 0
    by_id = {r.trial_id: r for r in records}
    settled = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        r = by_id.get(t.user_attrs.get(TRIAL_ATTR))
        if r is None or r.status in UNFINISHED:
            continue
        if r.status == "ERROR":
            study.tell(t.number, state=TrialState.FAIL)
        elif not math.isfinite(r.objective):  # stopped before its first epoch ended
            study.tell(t.number, state=TrialState.PRUNED)
        else:
            study.tell(t.number, r.objective)
        settled += 1
    return settled


def load_study(experiment_dir: Path):
    """The study of `optuna.db`, or None when the experiment has none (one run before the file existed)."""
    import optuna

    if not (Path(experiment_dir) / STUDY_FILE).is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=STUDY_NAME, storage=study_url(experiment_dir))
    except KeyError:  # the file exists but the search stopped before creating the study
        return None

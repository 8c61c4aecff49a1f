"""Every use of Optuna's private API, in one place: an Optuna release that changes one breaks here.

orch needs a few things Optuna keeps to itself: a study's storage and ids (to read and write one
trial of another process without the ``Study`` object that owns it), the heartbeat machinery of
RDB storages (to find trials whose worker fell silent, which Optuna only does inside
``Study.optimize``), and the journal file's lock (to mend a torn record under it). Each is one
small function here; nothing else in orch reaches past Optuna's public API.
"""

from __future__ import annotations

from typing import Any


def storage_of(ostudy) -> Any:
    """The storage a ``Study`` reads and writes."""
    return ostudy._storage


def study_id(ostudy) -> int:
    """A study's id in its storage (fixed for its life there)."""
    return ostudy._study_id


def trial_id(trial) -> int:
    """A trial's id in its storage (``Trial`` or ``FrozenTrial``)."""
    return trial._trial_id


def fresh(ostudy, trial) -> Any:
    """The trial as the storage holds it now (another process may have finished it)."""
    return ostudy._storage.get_trial(trial._trial_id)


def by_number(ostudy, number: int) -> Any:
    """Trial ``number`` of the study, as the storage holds it now."""
    storage = ostudy._storage
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(ostudy._study_id, number))


def set_attr(ostudy, trial, key: str, value: Any) -> None:
    """Set a user attribute of a running trial that this process does not own."""
    ostudy._storage.set_trial_user_attr(trial._trial_id, key, value)


def fail(ostudy, trial) -> None:
    """End a running trial that this process does not own as FAIL (raises if it finished meanwhile)."""
    import optuna

    ostudy._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)


def heartbeat_enabled(ostudy) -> bool:
    """Whether the study's storage records trials' heartbeats (RDB storages, as orch opens them)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(ostudy._storage)


def storage_bases(storage) -> tuple[tuple[type, ...], set[str]]:
    """The Optuna classes a wrapper of ``storage`` must derive from (a heartbeat storage too, if it
    is one) and the private methods of theirs that orch calls through it."""
    from optuna.storages import BaseStorage
    from optuna.storages._heartbeat import BaseHeartbeat

    if isinstance(storage, BaseHeartbeat):
        return (BaseStorage, BaseHeartbeat), {"_get_stale_trial_ids"}
    return (BaseStorage,), set()


def heartbeat_interval(ostudy) -> int:
    return ostudy._storage.get_heartbeat_interval()


def heartbeat_grace(ostudy) -> int | None:
    """The grace period, in seconds, after which a silent trial counts as lost (``None``: no heartbeats)."""
    storage = ostudy._storage
    return getattr(getattr(storage, "_backend", storage), "grace_period", None)


def record_heartbeat(ostudy, trial) -> None:
    ostudy._storage.record_heartbeat(trial._trial_id)


def stale_trial_ids(ostudy) -> tuple[set[int], int | None]:
    """The ids of the running trials whose heartbeat is older than the grace period, and that grace
    period in seconds (nothing and ``None`` for a storage without heartbeats)."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    storage = ostudy._storage
    if not (isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)):
        return set(), None
    stale = set(storage._get_stale_trial_ids(ostudy._study_id))
    return stale, getattr(storage, "_backend", storage).grace_period  # RDBStorage, under Optuna's cache


def running_trials(storage) -> list[tuple[str, Any]]:
    """``(study name, trial)`` for every running trial of every study in ``storage``."""
    import optuna

    return [(s.study_name, t) for s in storage.get_all_studies()
            for t in storage.get_all_trials(s._study_id, states=(optuna.trial.TrialState.RUNNING,))]


def journal_lock(path: str):
    """The lock Optuna's journal file backend takes around each append (a context manager)."""
    from optuna.storages.journal import JournalFileOpenLock
    from optuna.storages.journal._file import get_lock_file

    return get_lock_file(JournalFileOpenLock(str(path)))

"""Opening an Optuna storage from its URL: a journal file (checked first) or a database.

RDB storages record heartbeats of running trials (``study.heartbeat``), which is how a trial
whose worker vanished is found; orch fails and retries such trials itself
(:mod:`orchestrator.execution.claims`), in Optuna and MLflow alike. A journal file is checked
before use (:mod:`orchestrator.storage.journal`): one that is not a regular file is refused before
it is read, a torn last record is cut away, other damage refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from orchestrator.spec.study import HeartbeatSettings
from orchestrator.storage import journal
from orchestrator.storage.locks import init_lock
from orchestrator.storage.urls import connect_args, journal_path, sqlalchemy_url


def open_storage(url: str, heartbeat: HeartbeatSettings | None = None, writable: bool = True):
    """An Optuna storage from a URL: ``journal:PATH`` (file journal) or any SQLAlchemy URL (RDB).

    ``writable=False`` (a command that only reads) leaves even a torn last line of a journal alone.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    if journal_path(url) is not None:
        given = Path(journal_path(url)).expanduser()
        journal.check_kind(given)  # a device, FIFO, folder or dangling link: refused before it is read or made
        path = given.resolve()
        if not writable:
            journal.check(path, mend=False)  # damage is refused; nothing is written
            return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        path.parent.mkdir(parents=True, exist_ok=True)
        journal.check(path)  # a torn last record is cut away; other damage is refused, untouched
        return JournalStorage(journal.backend(path))
    heartbeat = heartbeat or HeartbeatSettings()
    engine = {"pool_pre_ping": True, "connect_args": connect_args(url)}  # a server that does not answer fails fast
    if url.startswith("sqlite:"):
        engine["connect_args"] = {"timeout": 60}  # writers queue for the file instead of failing
    # a fresh database's tables are created by the first process, under a lock: not by all at once
    with init_lock(url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(sqlalchemy_url(url), engine_kwargs=engine,
                                          heartbeat_interval=heartbeat.interval,
                                          grace_period=heartbeat.grace_period)

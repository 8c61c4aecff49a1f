"""Locks shared by every process that uses one store, on one machine or many.

orch needs a few steps to be atomic across processes: "count the trials, then ask for one" (so
that the budget is never overshot), creating a study with its MLflow parent run (so that there is
exactly one), handing each worker a sampler stream of its own, and creating an empty MLflow
database's tables. The lock lives where the store lives:

- a journal file or a SQLite database: a lock file beside it (processes of one machine);
- PostgreSQL: a session-level advisory lock (``pg_advisory_lock``), MySQL: ``GET_LOCK``; both are
  released by the server when the holder's connection drops, so a killed process cannot leave
  one behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import re

from orchestrator.errors import StoreError
from orchestrator.outages import connection_problem
from orchestrator.secrets import redact_url
from orchestrator.storage.urls import connect_args, dialect_of, file_of, sqlalchemy_url

#: lock, unlock and try-lock statements per dialect (``:key`` is bound)
_SQL = {"postgresql": ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"),
        "mysql": ("SELECT GET_LOCK(:key, -1)", "SELECT RELEASE_LOCK(:key)")}
_TRY = {"postgresql": "SELECT pg_try_advisory_lock(:key)", "mysql": "SELECT GET_LOCK(:key, 0)"}


def store_lock(url: str, key: str):
    """A lock named ``key`` on the store at ``url`` (a context manager, reusable).

    Raises :class:`~orchestrator.errors.StoreError` for a store that orch has no shared lock for.
    """
    path = file_of(url)
    if path is not None:
        from filelock import FileLock

        return FileLock(f"{path}.{_slug(key)}.lock")
    dialect = dialect_of(url)
    if dialect not in _SQL:
        raise StoreError(f"storage {redact_url(url)}: workers share the budget through a lock, which orch "
                         f"has for journal files, SQLite, PostgreSQL and MySQL, not for {dialect!r}")
    return AdvisoryLock(url, dialect, key)


@contextlib.contextmanager
def if_free(lock):
    """Hold ``lock`` (from :func:`store_lock`) if it is free now, without waiting: yields whether it
    is held (for work that may as well be skipped, such as a heartbeat thread's reaping)."""
    if isinstance(lock, AdvisoryLock):
        with lock.nowait() as held:
            yield held
        return
    from filelock import Timeout

    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def init_lock(url: str):
    """A lock around creating the tables of the database at ``url`` (no lock for a server URL)."""
    if file_of(url) is None and dialect_of(url) not in _SQL:
        return contextlib.nullcontext()
    return store_lock(url, "init")


def _slug(key: str) -> str:
    return re.sub(r"[^\w.-]+", "_", key)[:80]


class AdvisoryLock:
    """A database server's named lock, held on a connection of its own (in autocommit mode, so the
    holder is never "idle in transaction", which some servers end after a timeout). Re-entrant
    within one object, like a file lock. Session locks need a direct connection to the server (or
    a pooler in session mode): a pooler in transaction mode cannot hold them."""

    def __init__(self, url: str, dialect: str, key: str):
        self.url = sqlalchemy_url(url)
        self.lock_sql, self.unlock_sql = _SQL[dialect]
        self.try_sql = _TRY[dialect]
        if dialect == "postgresql":  # a signed 64-bit key derived from the name
            self.key = int.from_bytes(hashlib.sha256(f"orch:{key}".encode()).digest()[:8], "big", signed=True)
        else:  # MySQL lock names are at most 64 characters
            self.key = "orch:" + hashlib.sha256(key.encode()).hexdigest()[:40]
        self._engine = None
        self._conn = None
        self._depth = 0

    def _connect(self):
        import sqlalchemy

        if self._engine is None:  # one connection, kept between acquisitions (checked before each)
            self._engine = sqlalchemy.create_engine(self.url, pool_size=1, max_overflow=0, pool_pre_ping=True,
                                                    isolation_level="AUTOCOMMIT",
                                                    connect_args=connect_args(self.url))
        return self._engine.connect()

    def __enter__(self):
        import sqlalchemy

        if self._depth:
            self._depth += 1
            return self
        conn = self._connect()
        try:
            conn.execute(sqlalchemy.text(self.lock_sql), {"key": self.key})
        except BaseException:
            conn.close()
            raise
        self._conn, self._depth = conn, 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth:
            return
        conn, self._conn = self._conn, None
        self._release(conn)

    def _release(self, conn) -> None:
        import sqlalchemy

        try:
            conn.execute(sqlalchemy.text(self.unlock_sql), {"key": self.key})
        except Exception as exc:  # the connection is gone: the server released the lock with it
            if not connection_problem(exc):
                raise
        finally:
            conn.close()

    @contextlib.contextmanager
    def nowait(self):
        """The lock if it is free now (see :func:`if_free`), on a connection of its own."""
        import sqlalchemy

        if self._depth:
            raise RuntimeError("AdvisoryLock.nowait() on a lock this object holds")
        conn = self._connect()
        try:
            held = bool(conn.execute(sqlalchemy.text(self.try_sql), {"key": self.key}).scalar())
        except BaseException:
            conn.close()
            raise
        if not held:
            conn.close()
            yield False
            return
        try:
            yield True
        finally:
            self._release(conn)


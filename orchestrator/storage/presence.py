"""A study's journal file in use: every ``study run`` and ``study worker`` on it says so for its whole
life, so that ``orch study repair`` never rewrites the file under a live process, even one that is
between trials (holding no trial and no claim lock).

The sign is a shared ``flock`` on ``NAME.journal.<study>.live`` beside the journal, taken when the
command starts and dropped by the kernel when its process ends (also on ``kill -9``): a repair asks
for the same lock exclusively, without waiting, and refuses while anyone holds it. Its workers are
children that end with it. Databases need none of this: ``repair`` mends journal files only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from orchestrator import names
from orchestrator.errors import StoreError
from orchestrator.storage.urls import journal_path


def _path(journal: str, study: str) -> str:
    """The sign's file: beside the journal as the storage opens it (resolved), whatever the path given."""
    return f"{Path(journal).expanduser().resolve()}.{names.check(study)}.live"


def _refused(path: str, exc: OSError) -> StoreError:
    why = "it is a link, which orch never follows" if exc.errno == errno.ELOOP else exc.strerror
    return StoreError(f"cannot use {path}, which tells `orch study repair` that the journal is in use: {why}")


@contextlib.contextmanager
def present(storage_url: str, study: str):
    """Hold the sign that a process of ``study`` uses the journal at ``storage_url`` (nothing for
    other storages) until the block ends."""
    journal = journal_path(storage_url)
    if journal is None:
        yield
        return
    path = _path(journal, study)
    try:  # shared by every process of the study, never written: created if absent, never through a link
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise _refused(path, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # drops the lock


@contextlib.contextmanager
def alone(journal: str, study: str):
    """Yield whether no process of ``study`` uses ``journal`` now; while the block runs, none can
    start (a ``study run`` or ``study worker`` started meanwhile waits at :func:`present`). No sign
    file means no process has ever used the journal: then nothing is created."""
    path = _path(journal, study)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        yield True
        return
    except OSError as exc:
        raise _refused(path, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)

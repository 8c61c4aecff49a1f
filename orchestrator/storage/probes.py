"""Probe writes: a full disk or an unwritable folder found before the first trial, in one message.

Before a study opens its stores, and again before its workers start, orch writes (and removes)
a probe file of :data:`PROBE_BYTES` in every folder that the trials will write to: the journal
or SQLite file's folder, the MLflow store's folder and its artifacts, the checkpoint store. A
failure is a :class:`~orchestrator.errors.StoreError` naming the folder and the reason, so that a
full disk costs no trial (a trial burned per worker restart is what it would cost otherwise).
The probe is a new file of its own (:func:`orchestrator.safe_files.write_new`): a link planted in
the folder is never written through. A journal path that is not a regular file is refused before
its folder is probed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from orchestrator import safe_files
from orchestrator.errors import StoreError
from orchestrator.storage import journal
from orchestrator.storage.urls import file_of, journal_path, sqlite_path

#: bytes a probe writes: a disk with less room than this is as good as full
PROBE_BYTES = 1 << 20


def probe(folder: Path, what: str) -> None:
    """Write, sync and remove a probe file in ``folder``; folders it had to create are removed too."""
    folder = Path(folder).resolve()
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    path = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = safe_files.write_new(folder, f".orch-probe-{os.getpid()}-", b"\0" * PROBE_BYTES, mode=0o600, sync=True)
    except OSError as exc:
        raise StoreError(f"cannot write to {what} ({folder}): {exc.strerror or exc}; free space there or point it "
                         "elsewhere, then run the same command again") from None
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
        for made in created:  # deepest first: what a run writes there it creates itself
            with contextlib.suppress(OSError):
                made.rmdir()


def probe_stores(storage_url: str, tracking_uri: str | None) -> None:
    """Probe the local folders of an Optuna storage URL and an MLflow tracking URI."""
    if journal_path(storage_url) is not None:
        journal.check_kind(os.path.expanduser(journal_path(storage_url)))
    if file_of(storage_url):
        probe(Path(file_of(storage_url)).parent, "the Optuna storage")
    if tracking_uri and sqlite_path(tracking_uri):
        store = Path(sqlite_path(tracking_uri)).parent
        probe(store, "the MLflow store")
        probe(store / "artifacts", "the MLflow artifacts")

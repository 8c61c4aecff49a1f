"""Journal files, the default storage: checked before every use, never written past damage.

Optuna's journal is one JSON record per line, appended under a lock file. Two kinds of damage:

- a *torn tail*: the last line cut off by a crash (or a full disk) in the middle of a write.
  No process can have seen it as a record, so it is cut away automatically, under the journal's
  own write lock (so that a write in progress is never taken for one), its bytes kept in
  ``PATH.torn-TIME``;
- anything else (a line that is not a record, in the middle or complete at the end): the file
  is refused with one message naming it, the line and its byte offset, and nothing is appended
  to it. ``orch study repair`` then keeps a backup (``PATH.bak-TIME``) and rewrites the file
  with every valid record, unless that would renumber trials.

Appends go through :func:`backend`, which mends a torn tail before writing, so that a write that
failed half-way (a full disk) does not get the next record glued onto its fragment.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator import schema
from orchestrator.errors import StoreError
from orchestrator.storage import optuna_api, owners


@dataclass
class Damage:
    line: int  # 1-based
    offset: int  # byte offset of the line
    text: bytes
    torn: bool  # the last line, without its newline


def _record(raw: bytes) -> bool:
    try:
        rec = json.loads(raw)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False
    return isinstance(rec, dict) and "op_code" in rec


def scan(data: bytes) -> tuple[int, Damage | None]:
    """The number of valid records before the first damage, and that damage (``None``: none)."""
    offset = good = 0
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        if not raw.endswith(b"\n"):
            return good, Damage(number, offset, raw, torn=True)
        if not _record(raw):
            return good, Damage(number, offset, raw, torn=False)
        good += 1
        offset += len(raw)
    return good, None


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _mend_tail(path: Path) -> None:
    """Under the journal's lock: cut a torn last line away (or end a whole record with its newline)."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    tail = data[start:]
    if _record(tail):  # a whole record that lost only its newline
        with open(path, "ab") as f:
            f.write(b"\n")
            os.fsync(f.fileno())
        return
    (path.parent / f"{path.name}.torn-{_stamp()}").write_bytes(tail)
    with open(path, "r+b") as f:
        f.truncate(start)
        os.fsync(f.fileno())


def check(path: str | Path, mend: bool = True) -> None:
    """Make ``path`` safe to use: refuse damage (:class:`StoreError`), and with ``mend`` cut a torn
    tail away (readers need not: Optuna ignores an unfinished last line)."""
    path = Path(path)
    if not path.exists():
        return
    good, damage = scan(path.read_bytes())
    if damage is not None and damage.torn:
        if not mend:
            return
        with optuna_api.journal_lock(path):  # no write is in progress now
            _mend_tail(path)
        good, damage = scan(path.read_bytes())
    if damage is not None:
        raise StoreError(f"{path}: the journal is damaged at line {damage.line} (byte {damage.offset}): "
                         f"{damage.text[:80]!r} is not a journal record; nothing was written to it. Its "
                         f"{good} records before that line are intact: `orch study repair --storage journal:{path}` "
                         "keeps a backup and rewrites it with every valid record")


def backend(path: str | Path):
    """Optuna's journal file backend, whose appends first mend a torn tail that a failed write (a
    full disk) left behind, so that a record is never glued onto a fragment."""
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = Path(path)

    class Mending(JournalFileBackend):
        def append_logs(self, logs):
            with optuna_api.journal_lock(path):
                _mend_tail(path)
            super().append_logs(logs)

    return Mending(str(path), lock_obj=JournalFileOpenLock(str(path)))


#: Optuna's journal operation codes that create a trial, and that name one
_CREATE_TRIAL = 4


def repair(path: str | Path, force: bool = False) -> dict:
    """Back ``path`` up, then rewrite it with every valid record; returns what was kept and dropped.

    Refused (:class:`StoreError`) while a process of this machine is running one of its trials, and,
    unless ``force``, when a dropped line was a trial's creation (later records would then name
    the wrong trials: Optuna numbers trials in the order the journal creates them).
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such journal file")
    with optuna_api.journal_lock(path):
        data = path.read_bytes()
        kept, dropped = [], []
        for number, raw in enumerate(data.splitlines(keepends=True), start=1):
            (kept if _record(raw.rstrip(b"\r\n")) else dropped).append((number, raw))
        _check_numbering([json.loads(raw) for _, raw in kept], [n for n, _ in dropped], force)
        tmp = path.parent / f"{path.name}.repair-tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(raw if raw.endswith(b"\n") else raw + b"\n" for _, raw in kept))
            f.flush()
            os.fsync(f.fileno())
        try:
            _check_no_live_worker(tmp)
        except StoreError:
            tmp.unlink()
            raise
        backup = path.parent / f"{path.name}.bak-{_stamp()}"
        shutil.copy2(path, backup)
        os.replace(tmp, path)
    return {"journal": str(path), "backup": str(backup), "kept": len(kept),
            "dropped_lines": [number for number, _ in dropped]}


def _check_numbering(records: list[dict], dropped: list[int], force: bool) -> None:
    created = 0
    for rec in records:
        if rec.get("op_code") == _CREATE_TRIAL:
            created += 1
        elif "trial_id" in rec and rec["trial_id"] >= created and not force:
            raise StoreError(f"dropping line(s) {dropped} would renumber trials: a later record names trial id "
                             f"{rec['trial_id']}, but only {created} trials are created before it, so a dropped line "
                             "probably created one. Nothing was changed; `--force` drops them anyway (a backup is "
                             "kept), or restore the journal from a copy of your own")


def _check_no_live_worker(path: Path) -> None:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(path)))
    for study_name, t in optuna_api.running_trials(storage):
        owner = t.user_attrs.get(schema.WORKER, "")
        if owners.alive_here(owner):
            raise StoreError(f"trial {t.number} of study {study_name!r} is running in process "
                             f"{owners.split(owner)[1]}: stop the study's processes first (a repair rewrites the "
                             "file under them)")

"""Journal files, the default storage: checked before every use, never written past damage.

Optuna's journal is one JSON record per line, appended under a lock file. Two kinds of damage:

- a *torn tail*: the last line cut off by a crash (or a full disk) in the middle of a write.
  No process can have seen it as a record, so it is cut away automatically, under the journal's
  own write lock (so that a write in progress is never taken for one), its bytes kept in
  ``PATH.torn-TIME-RANDOM``;
- anything else (a line that is not a record, in the middle or complete at the end): the file
  is refused with one message naming it, the line and its byte offset, and nothing is appended
  to it. ``orch study repair`` then keeps a backup (``PATH.bak-TIME-RANDOM``) and rewrites the file
  with every valid record, unless that would renumber trials, or the file is no journal of the
  study named, or a process of this machine runs one of its trials.

Appends go through :func:`backend`, which mends a torn tail before writing, so that a write that
failed half-way (a full disk) does not get the next record glued onto its fragment.

A journal path that is there but is not a regular file (a device, a FIFO, a folder, a link to one
or to nothing) is refused before anything reads it (:func:`check_kind`); no message quotes the
file's content. The files orch makes beside a journal (torn tails, repair temporaries, backups)
are new files, created exclusively under names of their own (:mod:`orchestrator.safe_files`).
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator import names, safe_files, schema
from orchestrator.errors import StoreError
from orchestrator.storage import optuna_api, owners

#: Optuna's journal operation codes (``JournalOperation``): CREATE_STUDY (0) to DISCARD_TRIALS (10)
_OPS = range(0, 11)
_CREATE_STUDY, _CREATE_TRIAL = 0, 4


@dataclass
class Damage:
    line: int  # 1-based
    offset: int  # byte offset of the line
    text: bytes
    torn: bool  # the last line, without its newline


def _record(raw: bytes) -> bool:
    """Whether ``raw`` is one record of Optuna's journal: a JSON object with an operation code and
    the id of the worker that wrote it."""
    try:
        rec = json.loads(raw)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False
    if not isinstance(rec, dict):
        return False
    op = rec.get("op_code")
    return type(op) is int and op in _OPS and isinstance(rec.get("worker_id"), str)


def check_kind(path: str | Path) -> None:
    """Refuse (:class:`StoreError`) a journal path that is there but is not a regular file, before
    anything reads it or creates a file beside it (``/dev/zero`` would never end, a FIFO block)."""
    what = safe_files.not_regular(path)
    if what is not None:
        raise StoreError(f"{path} is {what}, not a journal file: a journal storage is a regular file (or a path "
                         "where none is yet); point --storage journal:PATH at one")


def _read(path: Path) -> bytes:
    try:
        return safe_files.read_regular(path)
    except safe_files.NotRegular:
        check_kind(path)
        raise StoreError(f"{path} is a symbolic link or not a regular file: refused") from None


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
    data = _read(path)
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    tail = data[start:]
    if _record(tail):  # a whole record that lost only its newline
        with os.fdopen(safe_files.open_regular(path, os.O_WRONLY | os.O_APPEND), "wb") as f:
            f.write(b"\n")
            os.fsync(f.fileno())
        return
    safe_files.write_new(path.parent, f"{path.name}.torn-{_stamp()}-", tail, sync=True)
    with os.fdopen(safe_files.open_regular(path, os.O_WRONLY), "wb") as f:
        f.truncate(start)
        os.fsync(f.fileno())


def check(path: str | Path, mend: bool = True) -> None:
    """Make ``path`` safe to use: refuse damage (:class:`StoreError`), and with ``mend`` cut a torn
    tail away (readers need not: Optuna ignores an unfinished last line)."""
    path = Path(path)
    check_kind(path)
    if not path.exists():
        return
    good, damage = scan(_read(path))
    if damage is not None and damage.torn:
        if not mend:
            return
        with optuna_api.journal_lock(path):  # no write is in progress now
            _mend_tail(path)
        good, damage = scan(_read(path))
    if damage is not None:  # its content is not shown: the file may be anything (/etc/shadow)
        raise StoreError(f"{path}: the journal is damaged at line {damage.line} (byte {damage.offset}): that line "
                         f"is not a journal record; nothing was written to it. Its {good} records before that line "
                         f"are intact: `orch study repair --storage journal:{path}` keeps a backup and rewrites it "
                         "with every valid record")


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


def repair(path: str | Path, study: str, force: bool = False) -> dict:
    """Back ``path`` up, then rewrite it with every valid record; returns what was kept and dropped.

    Refused (:class:`StoreError`, the file untouched) when it is not a journal of ``study`` (no
    record of it creates that study), while a process of this machine is running one of its
    trials, and, unless ``force``, when a dropped line was a trial's creation (later records would
    then name the wrong trials: Optuna numbers trials in the order the journal creates them). Call
    it holding the study's claim lock, so that no worker is claiming a trial meanwhile.
    """
    path = Path(path)
    check_kind(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such journal file")
    with optuna_api.journal_lock(path):
        fd = safe_files.open_regular(path)
        with os.fdopen(fd, "rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            data = f.read()
        kept, dropped = [], []
        for number, raw in enumerate(data.splitlines(keepends=True), start=1):
            (kept if _record(raw.rstrip(b"\r\n")) else dropped).append((number, raw))
        records = [json.loads(raw) for _, raw in kept]
        _check_study(path, records, study)
        _check_numbering(records, [n for n, _ in dropped], force)
        tmp = safe_files.write_new(path.parent, f"{path.name}.repair-", b"".join(
            raw if raw.endswith(b"\n") else raw + b"\n" for _, raw in kept), suffix=".tmp", mode=mode, sync=True)
        try:
            _check_no_live_worker(tmp, path)
            backup = safe_files.write_new(path.parent, f"{path.name}.bak-{_stamp()}-", data, mode=mode, sync=True)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return {"journal": str(path), "backup": str(backup), "kept": len(kept),
            "dropped_lines": [number for number, _ in dropped]}


def _check_study(path: Path, records: list[dict], study: str) -> None:
    """Refuse a file that is no journal of ``study`` (its content is never shown)."""
    if not records:
        raise StoreError(f"{path} is not an Optuna journal: none of its lines is a journal record. Nothing was "
                         "changed; name the study's journal file")
    if not any(r["op_code"] == _CREATE_STUDY and r.get("study_name") == study for r in records):
        raise StoreError(f"{path} is not a journal of study {names.shown(study)}: no record of it creates that study. "
                         "Nothing was changed; name the file that holds it, or the study that this file holds")


def _check_numbering(records: list[dict], dropped: list[int], force: bool) -> None:
    created = 0
    for rec in records:
        if rec.get("op_code") == _CREATE_TRIAL:
            created += 1
        elif isinstance(rec.get("trial_id"), int) and rec["trial_id"] >= created and not force:
            raise StoreError(f"dropping line(s) {dropped} would renumber trials: a later record names trial id "
                             f"{rec['trial_id']}, but only {created} trials are created before it, so a dropped line "
                             "probably created one. Nothing was changed; `--force` drops them anyway (a backup is "
                             "kept), or restore the journal from a copy of your own")


def _check_no_live_worker(records: Path, path: Path) -> None:
    """Refuse while a process of this machine runs a trial of the journal ``path``, as the file
    ``records`` (its valid records) tells."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    try:
        running = optuna_api.running_trials(JournalStorage(JournalFileBackend(str(records))))
    except Exception as exc:  # noqa: BLE001 - records that do not replay; what they hold is not shown
        raise StoreError(f"{path}: its records do not replay as an Optuna journal ({type(exc).__name__}); nothing "
                         "was changed; restore the journal from a copy of your own") from None
    for study_name, t in running:
        owner = t.user_attrs.get(schema.WORKER, "")
        if owners.alive_here(owner):
            raise StoreError(f"trial {t.number} of study {names.shown(study_name)} is running in process "
                             f"{owners.split(owner)[1]}: stop the study's processes first (a repair rewrites the "
                             "file under them); nothing was changed")

"""Journal files, the default storage: checked before every use, never written past damage.

Optuna's journal is one JSON record per line, appended under a lock file. Two kinds of damage:

- a *torn tail*: the last line cut off by a crash (or a full disk) in the middle of a write.
  No process can have seen it as a record, so it is cut away automatically, under the journal's
  own write lock (so that a write in progress is never taken for one), its bytes kept in
  ``PATH.torn-TIME``;
- anything else (a line that is not a record, in the middle or complete at the end): the file
  is refused with one message naming it, the line and its byte offset, and nothing is appended
  to it. ``orch study repair`` then keeps a backup (``PATH.bak-TIME``) and rewrites the file
  with every valid record.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import SpecError


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


def check(path: str | Path) -> None:
    """Make ``path`` safe to open: cut a torn tail away, refuse any other damage (:class:`SpecError`)."""
    path = Path(path)
    if not path.exists():
        return
    good, damage = scan(path.read_bytes())
    if damage is None:
        return
    if damage.torn:
        from optuna.storages.journal import JournalFileOpenLock
        from optuna.storages.journal._file import get_lock_file

        with get_lock_file(JournalFileOpenLock(str(path))):  # no write is in progress now
            data = path.read_bytes()
            good, damage = scan(data)
            if damage is not None and damage.torn:
                if _record(damage.text):  # a whole record that lost only its newline
                    with open(path, "ab") as f:
                        f.write(b"\n")
                else:
                    (path.parent / f"{path.name}.torn-{_stamp()}").write_bytes(damage.text)
                    with open(path, "r+b") as f:
                        f.truncate(damage.offset)
                        os.fsync(f.fileno())
                good, damage = scan(path.read_bytes())
    if damage is not None:
        raise SpecError(f"{path}: the journal is damaged at line {damage.line} (byte {damage.offset}): "
                        f"{damage.text[:80]!r} is not a journal record; nothing was written to it. Its "
                        f"{good} records before that line are intact: `orch study repair --storage journal:{path}` "
                        "keeps a backup and rewrites it with every valid record")


def repair(path: str | Path) -> dict:
    """Back ``path`` up, then rewrite it with every valid record; returns what was kept and dropped."""
    from optuna.storages.journal import JournalFileOpenLock
    from optuna.storages.journal._file import get_lock_file

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such journal file")
    with get_lock_file(JournalFileOpenLock(str(path))):
        data = path.read_bytes()
        backup = path.parent / f"{path.name}.bak-{_stamp()}"
        shutil.copy2(path, backup)
        kept, dropped = [], []
        for number, raw in enumerate(data.splitlines(keepends=True), start=1):
            (kept if _record(raw.rstrip(b"\r\n")) else dropped).append((number, raw))
        tmp = path.parent / f"{path.name}.repair-tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(raw if raw.endswith(b"\n") else raw + b"\n" for _, raw in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return {"journal": str(path), "backup": str(backup), "kept": len(kept),
            "dropped_lines": [number for number, _ in dropped]}

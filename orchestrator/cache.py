"""orch's user cache: files that only save work (the plugin listing and plugin check results as
JSON, ptb's tokenised corpus as tensors), so a missing, unreadable or unwritable one costs that
work again and nothing else.

The cache may lie in a folder that others can write to (``$ORCH_CACHE_DIR``): a file is written
under a fresh name and renamed into place (:mod:`orchestrator.safe_files`), never through a link
planted at its name, and read back only when it is a regular file of this user that no one else
may write to; anything else counts as no cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

import platformdirs

from orchestrator import names, safe_files
from orchestrator.errors import OrchError


def cache_dir() -> Path:
    """``$ORCH_CACHE_DIR`` if set, else the platform's user cache folder for orch."""
    return Path(os.environ.get("ORCH_CACHE_DIR") or platformdirs.user_cache_dir("orch"))


def path(name: str) -> Path:
    """Where the cache keeps ``name`` (a relative path). Its folder must lie in the cache folder
    (:class:`~orchestrator.errors.UsageError` if a link leads it out); the file itself is not
    resolved: a link there is never read (:func:`open_file`) nor written through (:func:`save`)."""
    *folders, leaf = Path(name).parts
    return names.under(cache_dir(), *folders) / leaf


def open_file(name: str) -> BinaryIO:
    """The file kept as ``name``, open for reading; :class:`OSError` unless it is a regular file of
    this user that no one else may write to."""
    try:
        where = path(name)
    except OrchError as exc:
        raise FileNotFoundError(str(exc)) from None
    return os.fdopen(safe_files.open_regular(where, own=True), "rb")


def read(name: str) -> Any:
    """The JSON value kept as ``name``, or ``None`` when there is none or it cannot be read."""
    try:
        with open_file(name) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def write(name: str, value: Any) -> None:
    """Keep the JSON of ``value`` as ``name``."""
    save(name, lambda out: out.write(json.dumps(value, indent=1).encode()))


def save(name: str, dump: Callable[[BinaryIO], Any], errors: tuple[type[BaseException], ...] = (OSError,)) -> None:
    """Keep what ``dump`` writes to a binary file as ``name``, atomically (readers see the old file
    or the new one, whole), readable by others as the umask allows, writable by this user only.
    ``errors`` raised on the way (a full or read-only disk) leave the cache as it was."""
    try:
        target = path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        safe_files.replace(path(name).parent, target.name, dump, mode=0o644)  # its folder checked again, made
    except (OrchError, *errors):
        pass

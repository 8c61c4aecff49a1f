"""orch's user cache: files that only save work (the plugin listing and plugin check results as
JSON, ptb's tokenised corpus as tensors), so a missing, unreadable or unwritable one costs that
work again and nothing else."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import platformdirs


def cache_dir() -> Path:
    """``$ORCH_CACHE_DIR`` if set, else the platform's user cache folder for orch."""
    return Path(os.environ.get("ORCH_CACHE_DIR") or platformdirs.user_cache_dir("orch"))


def read(name: str) -> Any:
    """The JSON value kept as ``name``, or ``None`` when there is none or it cannot be read."""
    try:
        return json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return None


def path(name: str) -> Path:
    """Where the cache keeps ``name`` (a relative path)."""
    return cache_dir() / name


def write(name: str, value: Any) -> None:
    """Keep the JSON of ``value`` as ``name``."""
    save(name, lambda out: out.write(json.dumps(value, indent=1).encode()))


def save(name: str, dump: Callable[[BinaryIO], Any], errors: tuple[type[BaseException], ...] = (OSError,)) -> None:
    """Keep what ``dump`` writes to a binary file as ``name``, atomically (readers see the old file
    or the new one, whole), readable as any file the user writes. ``errors`` raised on the way (a
    full or read-only disk) leave the cache as it was."""
    target = path(name)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as out:
            dump(out)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's file is private
        os.replace(tmp, target)
    except errors:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)

"""orch's user cache: small JSON files (the plugin listing, plugin check results) that only save
work, so a missing, unreadable or unwritable one costs that work again and nothing else."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """``$ORCH_CACHE_DIR`` if set, else the platform's user cache folder for orch."""
    import platformdirs

    return Path(os.environ.get("ORCH_CACHE_DIR") or platformdirs.user_cache_dir("orch"))


def read(name: str) -> Any:
    """The JSON value kept as ``name``, or ``None`` when there is none or it cannot be read."""
    try:
        return json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return None


def write(name: str, value: Any) -> None:
    """Keep ``value`` as ``name``, atomically (readers see the old file or the new one, whole)."""
    path = cache_dir() / name
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "w") as out:
            json.dump(value, out, indent=1)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)

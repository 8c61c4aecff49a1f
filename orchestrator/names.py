"""Names that become paths and MLflow names, and the paths orch derives from them.

A study's name becomes a journal file, a checkpoint folder, a report file and an MLflow
experiment; it is read from a study file, from ``--set study.name=...``, from a command line and
back from a shared storage that another process (or another user) wrote. Every one is checked
against one pattern, :data:`PATTERN`: a letter or digit (any script), then letters, digits,
``_``, ``.`` and ``-``, at most :data:`MAX_LENGTH` characters in all. No separator, no ``..``
component, no white space, control character, quote or markup can pass.

Every path derived from a name goes through :func:`under`, which resolves it and refuses one
that does not lie inside its root, so that even a name that slipped past the pattern could not
steer a write or a removal elsewhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from orchestrator.errors import UsageError

MAX_LENGTH = 100
#: what a name may be: unicode letters and digits, then also ``_ . -``
PATTERN = re.compile(rf"[^\W_][\w.-]{{0,{MAX_LENGTH - 1}}}")
RULE = (f"a name is 1 to {MAX_LENGTH} letters, digits, '_', '.' and '-', starting with a letter or digit "
        "(no '/', space, quote or control character)")


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters: a bad value named in a one-line error
    without printing all of it (a 100,000-character name, a huge expanded alias)."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, (dict, list, tuple, set)) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value) if not isinstance(value, (dict, list, tuple, set)) else _short_repr(value, limit)
    return text if len(text) <= limit + 20 else text[:limit] + "..."


def _short_repr(value, limit: int) -> str:
    parts, size = [], 0
    items = value.items() if isinstance(value, dict) else value
    for item in items:
        text = (f"{shown(item[0], 20)}: {shown(item[1], 20)}" if isinstance(value, dict) else shown(item, 20))
        size += len(text)
        if size > limit:
            parts.append("...")
            break
        parts.append(text)
    open_, close = {dict: "{}", list: "[]", tuple: "()", set: "{}"}[type(value) if type(value) in
                                                                     (dict, list, tuple, set) else list]
    return open_ + ", ".join(parts) + close


def problem(name: object) -> str | None:
    """Why ``name`` is not a valid name, or ``None``."""
    if not isinstance(name, str):
        return f"a name is text, not {type(name).__name__}"
    if not name:
        return "the name is empty"
    if len(name) > MAX_LENGTH:
        return f"the name has {len(name)} characters; at most {MAX_LENGTH}"
    if PATTERN.fullmatch(name) is None:
        return RULE
    return None


def check(name: object, what: str = "study name") -> str:
    """``name`` if it is a valid name, else a :class:`~orchestrator.errors.UsageError` (exit 2) that
    says which rule it breaks, showing the name cut short and with control characters escaped."""
    why = problem(name)
    if why is not None:
        raise UsageError(f"{what} {shown(name)} is not valid: {why}")
    return name  # type: ignore[return-value]


def under(root: str | os.PathLike, *parts: str) -> Path:
    """``root/parts...`` resolved, refused unless it lies inside ``root`` (itself resolved): the only
    way orch turns a name into a path it writes or removes."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise UsageError(f"{shown(str(Path(*parts)))} would lead out of {base}: refused")
    return path

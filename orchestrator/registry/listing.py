"""What ``orch plugins list`` shows, without importing every plugin on each call.

Loading the plugins imports torch and Lightning (about 4 s on a small CPU) only to learn, for
each entry point, whether it loads and honours its contract. That answer changes only when the
plugin's code, an installed distribution, the Python path or orch's contracts change, so the
listing is kept in orch's user cache under a stamp of all of these (the host, the distributions
installed on the path, the sizes and modification times of the plugins' and orch's files, and of
every other file the plugins imported that no installed distribution accounts for: editable or
path-installed code), all read without importing anything, and recomputed when any differs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import sys
import sysconfig
from importlib.metadata import entry_points
from pathlib import Path

from orchestrator import cache, registry
from orchestrator.contracts import KINDS

INSTALLED = (".dist-info", ".egg-info", ".egg-link", ".pth")
LISTING = "plugin-list.json"


def _files(top: str) -> list[str]:
    """Size and mtime of every Python file of the top-level module or package ``top``, found
    without importing it."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return [f"{top}: absent"]
    paths = [Path(p) for p in (spec.submodule_search_locations or [])]
    files = [p for d in paths for p in sorted(d.rglob("*.py"))] if paths else [Path(spec.origin or "")]
    return [f"{f}:{registry.signature(f)}" for f in files]


def _installed(entry: str) -> list[str]:
    try:
        with os.scandir(entry or ".") as found:
            return sorted(e.name for e in found if e.name.endswith(INSTALLED))
    except OSError:
        return ["absent"]


def stamp() -> str:
    """A digest of everything a plugin's status depends on that can be read without importing:
    the host, the interpreter, the path and what is installed on it, orch's and the plugins' own
    files. Any install, uninstall, upgrade or edit of these changes it."""
    parts = [socket.gethostname(), sys.executable, sys.version, f"import limit {registry.import_limit():g}", *sys.path]
    for entry in sys.path:  # an install, uninstall or upgrade changes these names
        parts += [f"{entry}/{name}" for name in _installed(entry)]
    tops = {"orchestrator"}  # orch itself, its contracts included
    for group in KINDS.values():
        for ep in sorted(entry_points(group=group), key=lambda e: (e.name, e.value)):
            dist = ep.dist
            parts.append(f"{group}:{ep.name}={ep.value}:{dist.name if dist else '?'}=={dist.version if dist else '?'}")
            tops.add(ep.module.split(".")[0])
    for top in sorted(tops):
        parts += _files(top)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _findable(module: str) -> bool:
    """Whether ``module``, which a plugin found missing, may be importable now, without importing
    anything: its top-level package is looked up; a submodule of one that exists counts as
    findable (only importing the package would tell)."""
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return True


def _loaded_files(before: set[str], found: list[registry.PluginInfo]) -> dict[str, list[int] | None]:
    """The source files of the modules imported since ``before``, and of the broken plugins'
    errors, that no installed distribution vouches for (outside the standard library and the
    folders holding dist-info): editable or path-installed code the plugins import, wherever it is."""
    covered = [str(Path(p).resolve()) for p in {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")} if p]
    covered += [str(Path(e or ".").resolve()) for e in sys.path if any(n.endswith(".dist-info") for n in _installed(e))]
    paths = [getattr(sys.modules.get(name), "__file__", None) for name in set(sys.modules) - before]
    paths += [f for info in found for f in info.files]
    files = {}
    for path in paths:
        if path and os.path.isabs(path) and not any(path.startswith(c + os.sep) for c in covered):
            files[path] = registry.signature(path)
    return files


def listing(refresh: bool = False) -> list[registry.PluginInfo]:
    """Every plugin of every kind as :func:`registry.discover_all` finds it (without ``obj``),
    from the cache when nothing it depends on changed; ``refresh``: load them all regardless."""
    key = stamp()
    if not refresh:
        try:
            saved = cache.read(LISTING) or {}
            if (saved.get("stamp") == key and all(registry.signature(f) == sig for f, sig in saved["files"].items())
                    and not any(_findable(name) for name in saved["missing"])):
                return [_info(row) for row in saved["plugins"]]
        except (KeyError, TypeError, AttributeError):
            pass  # a cache written by another orch, or edited by hand: load the plugins
    before = set(sys.modules)
    found = registry.discover_all(refresh=refresh)
    data = {"stamp": key, "files": _loaded_files(before, found), "plugins": [p.as_dict() for p in found],
            "missing": sorted({p.missing for p in found if p.missing})}
    cache.write(LISTING, data)  # a cache that cannot be written only costs the imports next time
    return found


def _info(row: dict) -> registry.PluginInfo:
    return registry.PluginInfo(kind=row["kind"], name=row["name"], value=row["entry_point"],
                               distribution=row["distribution"], version=row["version"],
                               status=row["status"], error=row["error"])

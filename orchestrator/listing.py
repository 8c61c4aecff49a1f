"""What ``orch plugins list`` shows, without importing every plugin on each call.

Loading the plugins imports torch and Lightning (about 4 s on a small CPU) only to learn, for
each entry point, whether it loads and honours its contract. That answer changes only when the
plugin's code, an installed distribution, the Python path or orch's contracts change, so the
listing is kept in orch's user cache under a stamp of all of these (the distributions installed
on the path, and the sizes and modification times of the plugins' and orch's files, all read
without importing anything) and recomputed when any of them differs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from orchestrator import registry
from orchestrator.contracts import KINDS


INSTALLED = (".dist-info", ".egg-info", ".egg-link", ".pth")


def cache_dir() -> Path:
    """orch's user cache (``$ORCH_CACHE_DIR`` if set): plugin listings and check results."""
    import platformdirs

    return Path(os.environ.get("ORCH_CACHE_DIR") or platformdirs.user_cache_dir("orch"))


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
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            out.append(f"{f}: unreadable")
    return out


def stamp() -> str:
    """A digest of everything a plugin's status depends on; any install, uninstall, upgrade or edit
    changes it."""
    parts = [sys.executable, sys.version]
    for entry in sys.path:  # what is installed where: an install, uninstall or upgrade changes these names
        try:
            with os.scandir(entry or ".") as found:
                parts += sorted(f"{entry}/{e.name}" for e in found if e.name.endswith(INSTALLED))
        except OSError:
            parts.append(f"{entry}: absent")
    tops = {"orchestrator"}  # orch itself, its contracts included
    for group in KINDS.values():
        for ep in sorted(entry_points(group=group), key=lambda e: (e.name, e.value)):
            dist = ep.dist
            parts.append(f"{group}:{ep.name}={ep.value}:{dist.name if dist else '?'}=={dist.version if dist else '?'}")
            tops.add(ep.value.split(":")[0].split(".")[0])
    for top in sorted(tops):
        parts += _files(top)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _file() -> Path:
    return cache_dir() / "plugin-list.json"


def listing(refresh: bool = False) -> list[registry.PluginInfo]:
    """Every plugin of every kind as :func:`registry.discover_all` finds it (without ``obj``),
    from the cache when nothing it depends on changed; ``refresh``: load them all regardless."""
    key = stamp()
    if not refresh:
        try:
            saved = json.loads(_file().read_text())
            if saved.get("stamp") == key:
                return [_info(row) for row in saved["plugins"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache, or an unreadable one: load the plugins
    found = registry.discover_all(refresh=refresh)
    try:
        path = _file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": key, "plugins": [p.as_dict() for p in found]}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs the imports next time
    return found


def _info(row: dict) -> registry.PluginInfo:
    return registry.PluginInfo(kind=row["kind"], name=row["name"], value=row["entry_point"],
                               distribution=row["distribution"], version=row["version"],
                               status=row["status"], error=row["error"])

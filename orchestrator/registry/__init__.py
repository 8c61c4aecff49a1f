"""Entry-point plugin discovery: ``orch.cells``, ``orch.datasets``, ``orch.modules``.

Every plugin loads inside its own ``try``: an import error, a contract violation, or any other
``BaseException`` of its import (``sys.exit()`` included; only ``KeyboardInterrupt`` stops the
command) turns into a :class:`PluginInfo` with ``status == "broken"`` and the error on one line, and
all other plugins keep working. An import that does not return within ``$ORCH_PLUGIN_IMPORT_TIMEOUT``
seconds (default 20) is broken too (:func:`_deadline`), and remembered in orch's user cache until a
file it ran through, its version or the limit changes (:func:`_hung`): no command waits for it twice.
Asking for a broken or unknown plugin raises :class:`PluginError` listing what is available. The
core never imports ``plugins/``: first-party plugins come through entry points like anyone's.

Beside discovery: the listing ``orch plugins list`` keeps (:mod:`~orchestrator.registry.listing`),
the quick contract checks (:mod:`~orchestrator.registry.checks`) and the scaffold of a new plugin
package (:mod:`~orchestrator.registry.scaffold`).
"""

from __future__ import annotations

import importlib
import math
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

from orchestrator import cache
from orchestrator.contracts import CONTRACTS, KINDS
from orchestrator.errors import PluginError

__all__ = ["PluginError", "PluginInfo", "available", "discover", "discover_all", "get", "get_info", "import_limit"]

LIMIT_VARIABLE = "ORCH_PLUGIN_IMPORT_TIMEOUT"
DEFAULT_LIMIT = 20.0
HUNG = "plugin-hung.json"
#: how long past the limit an import that the alarm could not interrupt may go on before the
#: watchdog ends the process
GRACE = 2.0


@dataclass
class PluginInfo:
    """What discovery found for one entry point."""

    kind: str
    name: str
    value: str
    distribution: str
    version: str
    status: str = "ok"
    error: str | None = None
    obj: type | None = field(default=None, repr=False)
    #: a broken plugin's: the source files its error went through, and the module it found
    #: missing, if that was the error (to notice when either is fixed)
    files: tuple[str, ...] = field(default=(), repr=False)
    missing: str | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "entry_point": self.value,
                "distribution": self.distribution, "version": self.version,
                "status": self.status, "error": self.error}


def _contract(group: str) -> type:
    module, name = CONTRACTS[group]
    return getattr(importlib.import_module(module), name)


def import_limit() -> float:
    """The seconds a plugin's import may take: ``$ORCH_PLUGIN_IMPORT_TIMEOUT``, default 20."""
    raw = os.environ.get(LIMIT_VARIABLE, "").strip()
    try:
        limit = float(raw) if raw else DEFAULT_LIMIT
    except ValueError:
        limit = math.nan
    if not (math.isfinite(limit) and limit > 0):
        raise PluginError(f"{LIMIT_VARIABLE}={raw!r} is not a number of seconds: set it to how long a plugin's "
                          "import may take (a positive number), or unset it for 20")
    return limit


class _ImportTimeout(BaseException):
    """Raised into a plugin's import that ran past the limit: a ``BaseException``, so that the
    plugin's own ``except Exception`` does not swallow it."""


def _late(limit: float) -> str:
    """The error of a plugin whose import did not return within ``limit`` seconds."""
    return (f"its import did not return within {limit:g} s (more time: set {LIMIT_VARIABLE}; "
            "`orch plugins list --refresh` tries it again)")


def signature(path: str) -> list[int] | None:
    """The size and modification time of the file at ``path`` (None if there is none): what tells
    that a plugin's file changed."""
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return None


def _hung_key(info: PluginInfo) -> str:
    return f"{info.kind}:{info.name}={info.value}:{info.distribution}=={info.version}"


def _hung_plugins() -> dict:
    """The plugins remembered as hung (:func:`_hung` reads it), as kept in orch's user cache."""
    saved = cache.read(HUNG)
    return saved if isinstance(saved, dict) else {}


def _hung(info: PluginInfo, limit: float, hangs: dict) -> tuple[float, tuple[str, ...]] | None:
    """``(limit it ran past, files)`` if ``hangs`` remembers that the import of ``info``'s plugin
    (this entry point, distribution and version) did not return within ``limit`` seconds or more,
    and none of the files it was running has changed since; else None."""
    row = hangs.get(_hung_key(info))
    try:
        if row and row["limit"] >= limit and all(signature(f) == sig for f, sig in row["files"].items()):
            return row["limit"], tuple(row["files"])
    except (KeyError, TypeError, AttributeError):
        pass  # a cache written by another orch, or edited by hand: import the plugin
    return None


def _remember_hung(info: PluginInfo, limit: float) -> None:
    """Remember that the import of ``info``'s plugin did not return within ``limit`` seconds, with
    the files it was running (``info.files``)."""
    hangs = _hung_plugins()
    hangs[_hung_key(info)] = {"limit": limit, "files": {f: signature(f) for f in info.files}}
    cache.write(HUNG, hangs)


def _files(tb: traceback.StackSummary) -> tuple[str, ...]:
    return tuple(dict.fromkeys(frame.filename for frame in tb))


@contextmanager
def _deadline(info: PluginInfo, limit: float):
    """Let the body (a plugin's import) run ``limit`` seconds at most.

    In the main thread a ``SIGALRM`` raises :class:`_ImportTimeout` into it: that ends a sleep, a
    wait on a socket, a lock or a process, and a loop of Python code. An import the alarm cannot
    reach (one stuck in C code, or one run outside the main thread, or while someone else's alarm is
    set) is left to a watchdog thread: ``GRACE`` seconds later it remembers the plugin as hung, says
    so on one line and ends the process with status 2; the next command skips that plugin.
    """
    alarm = (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
             and signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
             and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0))
    armed = [True]

    def ring(signum, frame):
        if armed[0]:
            armed[0] = False
            raise _ImportTimeout

    stuck = threading.current_thread().ident
    watchdog = threading.Timer(limit + (GRACE if alarm else 0.0), _give_up, (info, limit, stuck))
    watchdog.daemon = True
    if alarm:
        signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, limit)
    watchdog.start()
    try:
        yield
    finally:
        armed[0] = False  # first, and with no call before it: the alarm cannot ring into orch's own code
        watchdog.cancel()
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _give_up(info: PluginInfo, limit: float, stuck: int) -> None:
    """The watchdog's end of an import that nothing could interrupt: remember it, one line, exit 2."""
    frame = sys._current_frames().get(stuck)
    info.files = _files(traceback.extract_stack(frame)) if frame is not None else ()
    _remember_hung(info, limit)
    os.write(2, (f"error: {info.kind[:-1]} plugin {info.name!r} ({info.distribution} {info.version}): its import "
                 f"did not return within {limit:g} s and could not be interrupted; run the command again (the plugin "
                 f"is now reported as broken without being imported), or uninstall {info.distribution}\n").encode())
    os._exit(2)


def _one_line(exc: BaseException) -> str:
    """A plugin's error on one line."""
    if isinstance(exc, SystemExit):
        return f"its import called sys.exit({exc.code!r})"
    text = (f"{type(exc).__name__}: {exc}" if isinstance(exc, SyntaxError)  # not the source line and caret
            else "".join(traceback.format_exception_only(type(exc), exc)))
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def _load(kind: str, group: str, ep: EntryPoint, limit: float, hangs: dict) -> PluginInfo:
    dist = ep.dist
    info = PluginInfo(kind=kind, name=ep.name, value=ep.value,
                      distribution=dist.name if dist else "?", version=dist.version if dist else "?")
    known = _hung(info, limit, hangs)
    if known is not None:  # its import did not return last time, and nothing it ran through changed
        info.status, info.error, info.files = "broken", _late(known[0]), known[1]
        return info
    try:
        contract = _contract(group)  # torch, and Lightning: before the plugin's clock starts
        with _deadline(info, limit):
            obj = ep.load()
        if not (isinstance(obj, type) and issubclass(obj, contract)):
            raise TypeError(
                f"{ep.value} is {obj!r}, not a subclass of {contract.__module__}.{contract.__qualname__}"
            )
        info.obj = obj
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure of a plugin, sys.exit() too, must stay the plugin's
        info.status = "broken"
        info.error = _late(limit) if isinstance(exc, _ImportTimeout) else _one_line(exc)
        info.files = _files(traceback.extract_tb(exc.__traceback__))
        info.missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if isinstance(exc, _ImportTimeout):
            _remember_hung(info, limit)
    return info


_cache: dict[str, dict[str, PluginInfo]] = {}


def discover(kind: str, refresh: bool = False) -> dict[str, PluginInfo]:
    """All plugins of one kind (``cells``, ``datasets``, ``modules``) by name, broken ones included;
    ``refresh``: load them again, those remembered as hung included."""
    if kind not in KINDS:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
    if refresh or kind not in _cache:
        group, limit = KINDS[kind], import_limit()
        hangs = {} if refresh else _hung_plugins()
        found: dict[str, PluginInfo] = {}
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            if ep.name in found:  # the same name from two distributions: keep both visible
                dup = _load(kind, group, ep, limit, hangs)
                dup.status, dup.error = "broken", (
                    f"name {ep.name!r} is also provided by {found[ep.name].distribution}; "
                    "uninstall one of them")
                found[f"{ep.name} ({dup.distribution})"] = dup
                continue
            found[ep.name] = _load(kind, group, ep, limit, hangs)
        _cache[kind] = found
    return _cache[kind]


def discover_all(refresh: bool = False) -> list[PluginInfo]:
    """Every plugin of every kind, sorted by kind then name."""
    return [info for kind in KINDS for info in discover(kind, refresh).values()]


def available(kind: str) -> list[str]:
    """Names of the working plugins of one kind."""
    return [n for n, p in discover(kind).items() if p.status == "ok"]


def get_info(kind: str, name: str) -> PluginInfo:
    """The working plugin ``name`` of ``kind``; :class:`PluginError` if it is unknown or broken."""
    plugins = discover(kind)
    names = ", ".join(available(kind)) or "none"
    info = plugins.get(name)
    if info is None:
        raise PluginError(f"unknown {kind[:-1]} plugin {name!r}; available: {names}")
    if info.status != "ok":
        raise PluginError(
            f"{kind[:-1]} plugin {name!r} from {info.distribution} {info.version} is broken: "
            f"{info.error}; available: {names}")
    return info


def get(kind: str, name: str) -> type:
    """The class registered as ``name`` in ``kind``."""
    return get_info(kind, name).obj

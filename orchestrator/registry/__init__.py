"""Entry-point plugin discovery: ``orch.cells``, ``orch.datasets``, ``orch.modules``.

Every plugin loads inside its own ``try``: an import error or a contract violation turns into a
:class:`PluginInfo` with ``status == "broken"`` and the error, and all other plugins keep working.
Asking for a broken or unknown plugin raises :class:`PluginError` listing what is available.
The core never imports ``plugins/``: first-party plugins come through entry points like anyone's.

Beside discovery: the listing ``orch plugins list`` keeps (:mod:`~orchestrator.registry.listing`),
the quick contract checks (:mod:`~orchestrator.registry.checks`) and the scaffold of a new plugin
package (:mod:`~orchestrator.registry.scaffold`).
"""

from __future__ import annotations

import importlib
import traceback
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

from orchestrator.contracts import CONTRACTS, KINDS
from orchestrator.errors import PluginError

__all__ = ["PluginError", "PluginInfo", "available", "discover", "discover_all", "get", "get_info"]


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


def _load(kind: str, group: str, ep: EntryPoint) -> PluginInfo:
    dist = ep.dist
    info = PluginInfo(kind=kind, name=ep.name, value=ep.value,
                      distribution=dist.name if dist else "?", version=dist.version if dist else "?")
    try:
        obj = ep.load()
        contract = _contract(group)
        if not (isinstance(obj, type) and issubclass(obj, contract)):
            raise TypeError(
                f"{ep.value} is {obj!r}, not a subclass of {contract.__module__}.{contract.__qualname__}"
            )
        info.obj = obj
    except Exception as exc:  # noqa: BLE001 - any failure of a plugin must stay the plugin's
        info.status = "broken"
        info.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        info.files = tuple(dict.fromkeys(frame.filename for frame in traceback.extract_tb(exc.__traceback__)))
        info.missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    return info


_cache: dict[str, dict[str, PluginInfo]] = {}


def discover(kind: str, refresh: bool = False) -> dict[str, PluginInfo]:
    """All plugins of one kind (``cells``, ``datasets``, ``modules``) by name, broken ones included."""
    if kind not in KINDS:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
    if refresh or kind not in _cache:
        group = KINDS[kind]
        found: dict[str, PluginInfo] = {}
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            if ep.name in found:  # the same name from two distributions: keep both visible
                dup = _load(kind, group, ep)
                dup.status, dup.error = "broken", (
                    f"name {ep.name!r} is also provided by {found[ep.name].distribution}; "
                    "uninstall one of them")
                found[f"{ep.name} ({dup.distribution})"] = dup
                continue
            found[ep.name] = _load(kind, group, ep)
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

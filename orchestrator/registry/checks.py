"""Quick contract checks of installed plugins, where users meet them.

``orch plugins check`` runs each plugin's kit (:mod:`orchestrator.testing`, imported only when a
check runs: it loads torch) on tiny inputs; a
``study run``, ``study create``, ``study worker`` or ``train`` runs it for the plugins it uses
before anything is written, and refuses (exit 2) a plugin that breaks its contract. A dataset is
checked with its class attribute ``quick_check_settings`` (small settings) by ``plugins check``
and as configured by a run. Results are kept per plugin version and file in orch's user cache,
so a plugin is checked once, not on every run.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import asdict, dataclass

from orchestrator import cache as cache_file
from orchestrator import registry
from orchestrator.contracts import SECTIONS

CHECKS = "plugin-checks.json"


@dataclass
class Verdict:
    kind: str
    name: str
    distribution: str
    version: str
    status: str  # ok | failed | broken (does not load) | no data
    rule: str | None = None
    detail: str | None = None
    fix: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _stamp(info: registry.PluginInfo) -> str:
    """What identifies the code of a plugin: its distribution, version and its module file's mtime."""
    try:
        mtime = os.stat(inspect.getfile(info.obj)).st_mtime_ns
    except (TypeError, OSError):
        mtime = 0
    return f"{info.kind}:{info.name}:{info.distribution}=={info.version}:{info.value}:{mtime}"


def check(info: registry.PluginInfo, settings: dict | None = None, cache: bool = True) -> Verdict:
    """The quick check of one plugin (``settings``: a dataset's, default its ``quick_check_settings``)."""
    from orchestrator.contracts.dataset import DataUnavailable
    from orchestrator.testing import ContractError, check_cell, check_dataset, check_module

    verdict = Verdict(info.kind, info.name, info.distribution, info.version, "ok")
    if info.status != "ok":
        verdict.status, verdict.rule, verdict.detail = "broken", "load", info.error
        verdict.fix = "fix the import error or the entry point (see the error)"
        return verdict
    key = _stamp(info)
    store = (cache_file.read(CHECKS) or {}) if cache and info.kind != "datasets" else {}
    if key in store:
        return Verdict(**store[key])
    try:
        if info.kind == "cells":
            check_cell(info.obj)
        elif info.kind == "modules":
            check_module(info.obj)
        else:
            check_dataset(info.obj, **(settings if settings is not None else
                                       getattr(info.obj, "quick_check_settings", {})))
    except ContractError as exc:
        cause = exc.__cause__
        if isinstance(cause, DataUnavailable):
            verdict.status, verdict.detail = "no data", str(cause)
        else:
            verdict.status, verdict.rule, verdict.detail, verdict.fix = "failed", exc.rule, exc.detail, exc.fix
    if cache and info.kind != "datasets" and verdict.status in ("ok", "failed"):
        store[key] = verdict.as_dict()
        cache_file.write(CHECKS, store)
    return verdict


def refuse_broken(spec, datamodule=None, also: dict[str, set[str]] | None = None) -> None:
    """Raise a :class:`~orchestrator.testing.ContractError` naming the rule if a plugin of ``spec``
    (a RunSpec), or of ``also`` (names by kind), breaks its contract: cells and modules by their
    quick checks, the dataset as configured (``datamodule``)."""
    from orchestrator.testing import ContractError
    from orchestrator.testing.datasets import check_datamodule

    for section, kind in SECTIONS.items():
        if section == "dataset":  # checked below, as the run configures it
            continue
        for name in sorted({getattr(spec, section).plugin} | set((also or {}).get(kind, ()))):
            info = registry.get_info(kind, name)
            verdict = check(info)
            if verdict.status == "failed":
                raise ContractError(verdict.rule, f"{section} plugin {name!r} ({info.distribution} {info.version}) "
                                    f"breaks its contract: {verdict.detail} (`orch plugins check {name}` shows "
                                    "every rule)", verdict.fix)
    if datamodule is not None:
        try:
            check_datamodule(datamodule)
        except ContractError as exc:
            raise ContractError(exc.rule, f"dataset plugin {spec.dataset.plugin!r} breaks its contract: {exc.detail}",
                                exc.fix) from None

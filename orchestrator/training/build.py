"""One run's parts: resolve the plugins through the registry, build dataset + cell + module, and
check before anything is written that they fit and keep their contracts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch

from orchestrator import registry
from orchestrator.contracts import SECTIONS
from orchestrator.contracts.module import CellSpec, logged_metrics
from orchestrator.errors import IncompatibleError
from orchestrator.registry import checks
from orchestrator.spec.run import RunSpec
from orchestrator.training import footprint


@dataclass
class Built:
    datamodule: Any
    module: Any
    info: Any
    plugins: dict[str, dict[str, str]]


def _data(spec: RunSpec):
    """Resolve the plugins, build the dataset and check that the module trains its task."""
    plugins, classes = {}, {}
    for section, kind in SECTIONS.items():
        info = registry.get_info(kind, getattr(spec, section).plugin)
        classes[section] = info.obj
        plugins[section] = {"name": info.name, "distribution": info.distribution, "version": info.version}
    datamodule = classes["dataset"](**spec.dataset.settings)
    info = datamodule.describe()
    module_cls = classes["module"]
    if info.task not in module_cls.tasks:
        fitting = [n for n, p in registry.discover("modules").items()
                   if p.status == "ok" and info.task in p.obj.tasks]
        raise IncompatibleError(
            f"module {spec.module.plugin!r} trains {', '.join(module_cls.tasks) or 'no task'}, but dataset "
            f"{spec.dataset.plugin!r} is a {info.task} task; modules that fit it: {', '.join(fitting) or 'none'}")
    return classes, plugins, datamodule, info


def preflight(spec: RunSpec, also: dict[str, set[str]] | None = None, variants=()) -> tuple[str, ...]:
    """Check, before anything is written, that the data is there, the module fits the dataset, and
    the plugins keep their contracts (the quick checks of :mod:`orchestrator.registry.checks`; ``also``:
    more plugins by kind, such as the cells a study's space chooses from).

    The model of ``spec`` and of each of ``variants`` (a study's trials at the ends of its ranges, on
    the same dataset) must fit the device's memory (:mod:`orchestrator.training.footprint`).
    Returns the metrics the run logs each epoch. Raises :class:`IncompatibleError`, a
    :class:`~orchestrator.testing.ContractError`, or the dataset's own error (missing or corrupt files, ...).
    """
    classes, _, datamodule, info = _data(spec)
    checks.refuse_broken(spec, datamodule, also or {})
    for run in (spec, *variants):
        why = footprint.too_big(run, info)
        if why:
            raise IncompatibleError(why)
    return logged_metrics(classes["module"], tuple(info.val_sets))


def build(spec: RunSpec) -> Built:
    """Seed, then resolve the three plugins through the registry and build them, checking they fit."""
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    classes, plugins, datamodule, info = _data(spec)
    cell = CellSpec(spec.cell.plugin, classes["cell"], spec.cell.settings)
    module = classes["module"](cell=cell, info=info, **spec.module.settings)
    return Built(datamodule, module, info, plugins)


def device_of(spec: RunSpec) -> str:
    """The device a fit of ``spec`` runs on, as its run's tag says it (``cuda:0 (NVIDIA H200)``)."""
    device = str(spec.trainer.get("accelerator", "auto"))
    if device in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    return "cpu" if device == "auto" else device

"""One run: resolve plugins, build dataset + cell + module, run one Lightning fit, track it.

Used by ``orch train`` (one run of a file's fixed settings) and by every study trial.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from importlib.metadata import version as dist_version
from typing import Any

import yaml

from orchestrator import registry
from orchestrator.config import PLUGIN_SECTIONS, RunSpec


class IncompatibleError(ValueError):
    """The dataset and the module of a run do not fit each other."""


@dataclass
class Built:
    datamodule: Any
    module: Any
    info: Any
    plugins: dict[str, dict[str, str]]


@dataclass
class RunResult:
    run_id: str | None
    metrics: dict[str, float]
    status: str = "FINISHED"
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build(spec: RunSpec) -> Built:
    """Resolve the three plugins through the registry and build them, checking they fit."""
    from orchestrator.contracts.module import CellSpec

    plugins, classes = {}, {}
    for section, kind in PLUGIN_SECTIONS.items():
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
    cell = CellSpec(spec.cell.plugin, classes["cell"], spec.cell.settings)
    module = module_cls(cell=cell, info=info, **spec.module.settings)
    return Built(datamodule, module, info, plugins)


def make_trainer(spec: RunSpec, *, callbacks=(), logger=None, root_dir: str | None = None, **overrides):
    import pytorch_lightning as pl

    args: dict[str, Any] = {
        "logger": logger if logger is not None else False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": sys.stderr.isatty(),
        "default_root_dir": root_dir,
    }
    args.update(spec.trainer)
    args.update(overrides)
    args["callbacks"] = list(args.get("callbacks") or []) + list(callbacks)
    return pl.Trainer(**args)


def fit(spec: RunSpec, *, callbacks=(), logger=None, test: bool = False, built: Built | None = None,
        **trainer_overrides) -> dict[str, float]:
    """Seed, build and fit; returns the final ``callback_metrics`` (and test metrics if ``test``)."""
    import pytorch_lightning as pl

    pl.seed_everything(spec.seed, workers=True, verbose=False)
    built = built or build(spec)
    with tempfile.TemporaryDirectory(prefix="orch-") as root:
        trainer = make_trainer(spec, callbacks=callbacks, logger=logger, root_dir=root, **trainer_overrides)
        trainer.fit(built.module, datamodule=built.datamodule)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if test:
            for result in trainer.test(built.module, datamodule=built.datamodule, verbose=False):
                metrics.update({k: float(v) for k, v in result.items()})
                if logger is not None:
                    logger.log_metrics(dict(result), step=trainer.current_epoch)
    return metrics


def plugin_tags(plugins: dict[str, dict[str, str]]) -> dict[str, str]:
    tags = {}
    for section, p in plugins.items():
        tags[f"orch.{section}"] = p["name"]
        tags[f"orch.{section}.distribution"] = f"{p['distribution']}=={p['version']}"
    return tags


def tracked_run(spec: RunSpec, *, tracking_uri: str | None, experiment: str, run_name: str | None = None,
                parent_run_id: str | None = None, tags: dict[str, str] | None = None, callbacks=(),
                test: bool = False, **trainer_overrides) -> RunResult:
    """Fit ``spec`` inside an MLflow run: params, tags, per-epoch metrics, config, traceback.

    On an exception the run is marked FAILED with the traceback as ``traceback.txt`` and the
    exception is re-raised for the caller (a study marks the trial failed and goes on).
    """
    import torch

    from orchestrator import tracking

    mlf = tracking.client(tracking_uri)
    exp_id = tracking.experiment_id(mlf, experiment)
    all_tags = {"orch.seed": str(spec.seed), "orch.version": dist_version("orch")}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update(tags or {})
    run = mlf.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    logger = None
    try:
        tracking.log_params(mlf, run_id, spec.flat_params())
        mlf.log_text(run_id, yaml.safe_dump(spec.resolved(), sort_keys=False), "config.yaml")
        built = build(spec)
        device = str(spec.trainer.get("accelerator", "auto"))
        if device in ("auto", "gpu", "cuda") and torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
        elif device == "auto":
            device = "cpu"
        run_tags = {**plugin_tags(built.plugins), "orch.device": device}
        for k, v in run_tags.items():
            mlf.set_tag(run_id, k, v)
        logger = tracking.EpochLogger(mlf, run_id)
        metrics = fit(spec, callbacks=callbacks, logger=logger, test=test, built=built, **trainer_overrides)
        logger.flush()
    except BaseException as exc:
        if logger is not None:
            logger.flush()  # keep the epochs that did finish
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        mlf.log_text(run_id, traceback.format_exc(), "traceback.txt")
        mlf.set_tag(run_id, "orch.error", f"{type(exc).__name__}: {exc}"[:5000])
        mlf.set_terminated(run_id, status)
        raise
    mlf.set_terminated(run_id, "FINISHED")
    return RunResult(run_id, metrics, extra={"plugins": built.plugins, "device": device})


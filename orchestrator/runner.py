"""One run: resolve plugins, build dataset + cell + module, run one Lightning fit, track it.

Used by ``orch train`` (one run of a file's fixed settings) and by every study trial.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
import traceback
from dataclasses import dataclass
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import yaml

from orchestrator import registry
from orchestrator.config import PLUGIN_SECTIONS, RunSpec
from orchestrator.secrets import redact, redact_data


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
    run_id: str
    metrics: dict[str, float]
    plugins: dict[str, dict[str, str]]


def _data(spec: RunSpec):
    """Resolve the plugins, build the dataset and check that the module trains its task."""
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
    return classes, plugins, datamodule, info


def preflight(spec: RunSpec, also: dict[str, set[str]] | None = None) -> None:
    """Check, before anything is written, that the data is there, the module fits the dataset, and
    the plugins keep their contracts (the quick checks of :mod:`orchestrator.checks`; ``also``:
    more plugins by kind, such as the cells a study's space chooses from).

    Raises :class:`IncompatibleError`, a :class:`~orchestrator.testing.ContractError`, or the
    dataset's own error (missing or corrupt files, ...).
    """
    from orchestrator import checks

    _, _, datamodule, _ = _data(spec)
    checks.refuse_broken(spec, datamodule, also or {})


def build(spec: RunSpec) -> Built:
    """Seed, then resolve the three plugins through the registry and build them, checking they fit."""
    import pytorch_lightning as pl

    from orchestrator.contracts.module import CellSpec

    pl.seed_everything(spec.seed, workers=True, verbose=False)
    classes, plugins, datamodule, info = _data(spec)
    cell = CellSpec(spec.cell.plugin, classes["cell"], spec.cell.settings)
    module = classes["module"](cell=cell, info=info, **spec.module.settings)
    return Built(datamodule, module, info, plugins)


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _quiet_lightning() -> None:
    """Drop Lightning's product tip and a deprecation warning raised inside Lightning itself."""
    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _NoAdverts) for f in log.filters):
        log.addFilter(_NoAdverts())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def make_trainer(spec: RunSpec, *, callbacks=(), logger=None, root_dir: str | None = None, **overrides):
    import pytorch_lightning as pl

    _quiet_lightning()
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
    from orchestrator.device_data import StreamsOnDevice

    args["callbacks"] = list(args.get("callbacks") or []) + list(callbacks) + [StreamsOnDevice()]
    if args["enable_progress_bar"] and not any(isinstance(c, pl.callbacks.ProgressBar) for c in args["callbacks"]):
        from orchestrator.progress import TrainingBar

        args["callbacks"].append(TrainingBar())
    return pl.Trainer(**args)


def fit(spec: RunSpec, *, callbacks=(), logger=None, test: bool = False, built: Built | None = None,
        resume: str | Path | None = None, **trainer_overrides) -> dict[str, float]:
    """Build (unless given) and fit, from the checkpoint ``resume`` if given; returns the final
    ``callback_metrics`` (and test metrics if ``test``)."""
    built = built or build(spec)
    with tempfile.TemporaryDirectory(prefix="orch-") as root:
        trainer = make_trainer(spec, callbacks=callbacks, logger=logger, root_dir=root, **trainer_overrides)
        trainer.fit(built.module, datamodule=built.datamodule, ckpt_path=str(resume) if resume else None,
                    weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if test:
            for result in trainer.test(built.module, datamodule=built.datamodule, verbose=False):
                metrics.update({k: float(v) for k, v in result.items()})
    return metrics


def plugin_tags(plugins: dict[str, dict[str, str]]) -> dict[str, str]:
    tags = {}
    for section, p in plugins.items():
        tags[f"orch.{section}"] = p["name"]
        tags[f"orch.{section}.distribution"] = f"{p['distribution']}=={p['version']}"
    return tags


def start_run(mlf, experiment: str, *, run_name: str | None = None, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    """Create an MLflow run (a child run when ``parent_run_id`` is given) and return its id."""
    from orchestrator import tracking

    all_tags = {"orch.version": dist_version("orch")}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update(tags or {})
    return mlf.create_run(tracking.experiment_id(mlf, experiment), run_name=run_name, tags=all_tags).info.run_id


#: orch's final state of a run -> MLflow run status. A pruned trial finished what the study asked of
#: it (its metrics are valid up to the epoch it was pruned at); ``interrupted`` (stopped by a signal)
#: and ``lost`` (its worker died) are retried. The ``orch.state`` tag, and a ``[state]`` suffix on
#: the run's name for every state but complete, tell them apart in the MLflow UI at a glance.
STATUS = {"complete": "FINISHED", "pruned": "FINISHED", "failed": "FAILED", "killed": "KILLED",
          "interrupted": "KILLED", "lost": "KILLED"}


def end_run(mlf, run_id: str, state: str, error: BaseException | str | None = None) -> None:
    """Close a run with ``state`` (complete, pruned, failed, killed) and, for a failure, its traceback."""
    if error is not None:
        if isinstance(error, BaseException):
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            reason = f"{type(error).__name__}: {error}"
        else:
            text = reason = error
        text, reason = redact(text), redact(reason)
        if state == "failed":
            mlf.log_text(run_id, text, "traceback.txt")
        mlf.set_tag(run_id, "orch.error" if state == "failed" else "orch.reason", reason[:5000])
    mlf.set_tag(run_id, "orch.state", state)
    if state != "complete":
        name = mlf.get_run(run_id).info.run_name
        if name and not name.endswith("]"):
            mlf.update_run(run_id, name=f"{name} [{state}]")
    mlf.set_terminated(run_id, STATUS[state])


def device_of(spec: RunSpec) -> str:
    import torch

    device = str(spec.trainer.get("accelerator", "auto"))
    if device in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    return "cpu" if device == "auto" else device


def tracked_fit(spec: RunSpec, mlf, run_id: str, *, callbacks=(), test: bool = False,
                checkpoint: tuple[str, str] | None = None, ckpt_dir: Path | None = None, ckpt_key: str = "",
                resume: Path | None = None, **trainer_overrides) -> RunResult:
    """Fit ``spec`` inside the MLflow run ``run_id``: params, tags, config, per-epoch metrics.

    ``checkpoint=(metric, "min"|"max")`` keeps the best epoch's checkpoint and logs it as the
    artifact ``checkpoints/best.ckpt``. ``ckpt_dir``: a folder of the checkpoint store
    (:mod:`orchestrator.checkpoints`) that receives ``last.ckpt`` every epoch (marked with
    ``ckpt_key``) and the best checkpoint; ``resume``: a ``last.ckpt`` to continue from. Exceptions propagate (after the
    finished epochs are flushed); the caller closes the run with :func:`end_run`.
    """
    from orchestrator import tracking
    from orchestrator.epoch_logger import EpochLogger

    tracking.log_params(mlf, run_id, spec.flat_params())
    mlf.log_text(run_id, yaml.safe_dump(redact_data(spec.resolved()), sort_keys=False), "config.yaml")
    built = build(spec)
    device = device_of(spec)
    for k, v in {**plugin_tags(built.plugins), "orch.device": device, "orch.seed": str(spec.seed)}.items():
        mlf.set_tag(run_id, k, v)
    logger = EpochLogger(mlf, run_id)
    callbacks = list(callbacks)
    with tempfile.TemporaryDirectory(prefix="orch-ckpt-") as tmp:
        directory = Path(ckpt_dir or tmp)
        if ckpt_dir:
            from orchestrator.checkpoints import LastCheckpoint

            directory.mkdir(parents=True, exist_ok=True)
            callbacks.append(LastCheckpoint(directory, ckpt_key))
        if checkpoint:
            from pytorch_lightning.callbacks import ModelCheckpoint

            best = ModelCheckpoint(dirpath=directory, filename="best", monitor=checkpoint[0], mode=checkpoint[1],
                                   save_top_k=1, save_weights_only=True)
            callbacks.append(best)
            trainer_overrides["enable_checkpointing"] = True
        try:
            metrics = fit(spec, callbacks=callbacks, logger=logger, test=test, built=built, resume=resume,
                          **trainer_overrides)
        finally:
            logger.flush()  # keep the epochs that did finish
        if checkpoint and best.best_model_path:
            mlf.log_artifact(run_id, best.best_model_path, "checkpoints")
    return RunResult(run_id, metrics, built.plugins)

"""One Lightning fit of a run, and the same fit tracked in an MLflow run.

Used by ``orch train`` (one run of a file's fixed settings) and by every study trial.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from orchestrator import outages, schema
from orchestrator.spec.run import RunSpec
from orchestrator.tracking.epoch_logger import EpochLogger
from orchestrator.tracking.runs import log_settings, tag_fit
from orchestrator.training.build import Built, build, device_of
from orchestrator.training.callbacks import StreamsOnDevice, TrainingBar
from orchestrator.training.checkpoints import LastCheckpoint
from orchestrator.training.quiet import quiet_lightning
from orchestrator.training.resumable import resumable


@dataclass
class RunResult:
    run_id: str
    metrics: dict[str, float]
    plugins: dict[str, dict[str, str]]


def make_trainer(spec: RunSpec, *, callbacks=(), logger=None, root_dir: str | None = None, **overrides):
    quiet_lightning()
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
    args["callbacks"] = list(args.get("callbacks") or []) + list(callbacks) + [StreamsOnDevice()]
    if args["enable_progress_bar"] and not any(isinstance(c, pl.callbacks.ProgressBar) for c in args["callbacks"]):
        args["callbacks"].append(TrainingBar())
    return pl.Trainer(**args)


def fit(spec: RunSpec, *, callbacks=(), logger=None, test: bool = False, built: Built | None = None,
        resume: str | Path | None = None, **trainer_overrides) -> dict[str, float]:
    """Build (unless given) and fit, from the checkpoint ``resume`` if given; returns the final
    ``callback_metrics`` (and test metrics if ``test``)."""
    built = built or build(spec)
    with tempfile.TemporaryDirectory(prefix="orch-") as root:
        trainer = make_trainer(spec, callbacks=callbacks, logger=logger, root_dir=root, **trainer_overrides)
        if trainer.world_size == 1:
            resumable(built.datamodule)  # its training loader's position and random states go in a checkpoint
        trainer.fit(built.module, datamodule=built.datamodule, ckpt_path=str(resume) if resume else None,
                    weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if test:
            for result in trainer.test(built.module, datamodule=built.datamodule, verbose=False):
                metrics.update({k: float(v) for k, v in result.items()})
    return metrics


def tracked_fit(spec: RunSpec, mlf, run_id: str, *, callbacks=(), test: bool = False,
                checkpoint: tuple[str, str] | None = None, ckpt_line=None, ckpt_key: str = "",
                ckpt_every: tuple[int | None, float | None] = (None, None), resume: Path | None = None,
                may_write=lambda: True, **trainer_overrides) -> RunResult:
    """Fit ``spec`` inside the MLflow run ``run_id``: params, tags, config, per-epoch metrics.

    ``checkpoint=(metric, "min"|"max")`` keeps the best epoch's checkpoint and logs it as the
    artifact ``checkpoints/best.ckpt``. ``ckpt_line``: a line of the checkpoint store
    (:mod:`orchestrator.training.stores`) that receives ``last.ckpt`` every epoch, every
    ``ckpt_every`` = (windows, seconds) inside an epoch and when a stop is requested (marked with
    ``ckpt_key``); ``resume``: a ``last.ckpt`` to continue from. Exceptions
    propagate (after the finished epochs are flushed); the caller closes the run
    (:func:`~orchestrator.tracking.runs.end_run`).

    During the fit, calls to a store that is away do not wait (:func:`orchestrator.outages.no_wait`):
    metrics and reports are kept and written when it answers, at the latest after the fit, where
    the final flush waits for it. ``may_write()``: whether the run is still the caller's to write.
    """
    log_settings(mlf, run_id, spec)
    built = build(spec)
    tag_fit(mlf, run_id, built.plugins, device_of(spec), spec.seed, torch.get_num_threads())
    logger = EpochLogger(mlf, run_id, may_write=may_write)
    callbacks = list(callbacks)
    with tempfile.TemporaryDirectory(prefix="orch-ckpt-") as tmp:
        if ckpt_line is not None:
            # first: a stop request is checkpointed before the interruption callback ends the fit
            callbacks.insert(0, LastCheckpoint(ckpt_line, ckpt_key, *ckpt_every, may_write=may_write))
        if checkpoint:
            # the best weights go to this process's private folder, never into the shared store
            # (where a link planted at best.ckpt could redirect the write): logged to MLflow at the end
            best = ModelCheckpoint(dirpath=tmp, filename="best", monitor=checkpoint[0], mode=checkpoint[1],
                                   save_top_k=1, save_weights_only=True)
            callbacks.append(best)
            trainer_overrides["enable_checkpointing"] = True
        try:
            with outages.no_wait():
                metrics = fit(spec, callbacks=callbacks, logger=logger, test=test, built=built, resume=resume,
                              **trainer_overrides)
        finally:
            try:
                logger.flush()  # keep the epochs that did finish (waits for a tracking store that is away)
            finally:
                if ckpt_line is not None:  # the checkpoints being uploaded (a stop signal's too)
                    failed = ckpt_line.wait()
                    if failed is not None:  # a retry resumes from an earlier one, or starts over
                        print(f"warning: the last checkpoint was not uploaded: {failed}", file=sys.stderr)
        if checkpoint and best.best_model_path:
            mlf.log_artifact(run_id, best.best_model_path, schema.CHECKPOINTS)
    return RunResult(run_id, metrics, built.plugins)

"""The study's checkpoint store: what lets a retried trial continue instead of starting over.

Each trial of a study writes, at the end of every epoch but the last, ``last.ckpt`` (weights,
optimiser and scheduler, the loops' progress, the callbacks' state, and the random number
generators' states) into a folder of its *lineage*: the trial it retries, or itself. The file
becomes the one to resume from (``last.json`` names its epoch and the trial's fingerprint) only
once that epoch's metrics are in MLflow, so a retry never skips an epoch that was not logged, and
never resumes another trial's checkpoint. The trial's best checkpoint
(``best.ckpt``, logged to MLflow at the end) lives beside it. A trial that is interrupted
(Ctrl-C, SIGTERM, preemption) or lost (its worker died) leaves the folder behind; its retry
resumes from ``last.ckpt`` at the next epoch, and its MLflow run receives the earlier epochs'
metrics from the interrupted run (:func:`orchestrator.tracking.runs.copy_history`), so that every
epoch is logged once. A trial that ends
(complete, pruned, failed) removes its folder.

Files are written to a temporary name of the writing process and renamed, so a kill mid-write
leaves the previous epoch's checkpoint whole; they are loaded with ``weights_only=True``. The store is
``study.checkpoint_dir`` (default ``mlruns/checkpoints``): on several machines, a shared
filesystem lets a retry on another machine resume too (else it starts over).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytorch_lightning as pl
import torch

LAST = "last.ckpt"
INDEX = "last.json"


def folder(root: str | Path, study: str, lineage: int) -> Path:
    """The folder of a line of trials in the store at ``root``."""
    return Path(root).resolve() / study / f"trial-{lineage}"


def fingerprint(study_id: int, lineage: int, params: dict) -> str:
    """What ties a checkpoint to one line of trials of one study (and its parameters)."""
    text = json.dumps([study_id, lineage, sorted(params.items())], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resume_epoch(directory: Path, key: str) -> int | None:
    """The epoch to resume at from ``directory`` (``None``: nothing to resume for ``key``)."""
    try:
        index = json.loads((Path(directory) / INDEX).read_text())
    except (OSError, ValueError):
        return None
    if index.get("key") != key or not (Path(directory) / LAST).is_file():
        return None
    return int(index["epoch"]) + 1


def _rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class LastCheckpoint(pl.Callback):
    """Keeps ``last.ckpt`` in ``directory``: written at the end of every training epoch but the
    last (after its validation), published when the next epoch starts, once the loggers have
    written the finished epoch's metrics; carries the RNG states in its own state."""

    def __init__(self, directory: Path, key: str):
        self.directory = Path(directory)
        self.key = key
        self._pending: tuple[Path, int] | None = None

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs:
            return  # the last epoch: a retry would have nothing left to train
        tmp = self.directory / f"{LAST}.{os.getpid()}.tmp"
        trainer.save_checkpoint(tmp)
        self._pending = (tmp, trainer.current_epoch)

    def on_train_epoch_start(self, trainer, module) -> None:
        if self._pending is None:
            return
        tmp, epoch = self._pending
        written = True
        for logger in trainer.loggers:  # the finished epoch's metrics first, then the checkpoint
            written = (getattr(logger, "flush", logger.save)() is not False) and written
        if not written:  # the tracking store is away: published once its metrics are written
            return
        self._pending = None
        os.replace(tmp, self.directory / LAST)
        index = self.directory / f"{INDEX}.{os.getpid()}.tmp"
        index.write_text(json.dumps({"epoch": epoch, "key": self.key}))
        os.replace(index, self.directory / INDEX)

    def state_dict(self) -> dict:
        return {"rng": _rng_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        _set_rng_state(state_dict["rng"])


def remove(directory: Path) -> None:
    """Remove a line's folder (nothing is left to resume)."""
    shutil.rmtree(directory, ignore_errors=True)

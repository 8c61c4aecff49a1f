"""The study's checkpoint store: what lets a retried trial continue instead of starting over.

Each trial of a study writes, at the end of every epoch, ``last.ckpt`` (weights, optimiser and
scheduler, the loops' progress, the callbacks' state, and the random number generators' states)
into a folder of its *lineage*: the trial it retries, or itself. The trial's best checkpoint
(``best.ckpt``, logged to MLflow at the end) lives beside it. A trial that is interrupted
(Ctrl-C, SIGTERM, preemption) or lost (its worker died) leaves the folder behind; its retry
resumes from ``last.ckpt`` at the next epoch, and its MLflow run receives the earlier epochs'
metrics from the interrupted run, so that every epoch is logged once. A trial that ends
(complete, pruned, failed) removes its folder.

Files are written to a temporary name and renamed, so a kill mid-write leaves the previous
epoch's checkpoint whole; they are loaded with ``weights_only=True``. The store is
``study.checkpoint_dir`` (default ``mlruns/checkpoints``): on several machines, a shared
filesystem lets a retry on another machine resume too (else it starts over).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytorch_lightning as pl
import torch

LAST = "last.ckpt"
BEST = "best"  # ModelCheckpoint adds .ckpt


def folder(root: str | Path, study: str, lineage: int) -> Path:
    return Path(root).resolve() / study / f"trial-{lineage}"


def resume_epoch(path: Path) -> int | None:
    """The epoch to resume at from ``path`` (``None``: no usable checkpoint)."""
    if not path.is_file():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"]) + 1
    except Exception:  # noqa: BLE001 - a damaged file is as good as none: the trial starts over
        return None


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
    """Writes ``last.ckpt`` into ``directory`` at the end of every training epoch (after its
    validation), atomically; carries the RNG states in its own state."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LAST

    def on_train_epoch_end(self, trainer, module) -> None:
        tmp = self.path.with_suffix(".tmp")
        trainer.save_checkpoint(tmp)
        os.replace(tmp, self.path)

    def state_dict(self) -> dict:
        return {"rng": _rng_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        _set_rng_state(state_dict["rng"])


def copy_history(mlf, source_run: str, target_run: str, before_epoch: int) -> int:
    """Log ``source_run``'s metrics of the epochs before ``before_epoch`` to ``target_run``."""
    from mlflow.entities import Metric

    metrics = []
    for key in mlf.get_run(source_run).data.metrics:
        metrics += [Metric(key, m.value, m.timestamp, m.step) for m in mlf.get_metric_history(source_run, key)
                    if m.step < before_epoch]
    for i in range(0, len(metrics), 1000):
        mlf.log_batch(target_run, metrics=metrics[i:i + 1000])
    return len(metrics)


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)

"""The data of a fit kept on its device: every :class:`~orchestrator.contracts.dataset.StreamWindows`
that a training, validation or test loader reads is moved to the module's device when that loop
starts, once. A window is then a slice of a tensor already there, and Lightning's per-step
transfer of the batch has nothing to copy (two host-to-device copies a step fewer on a GPU; the
whole PTB stream is 15 MB). Streams read by DataLoader worker processes or pinned are left on the
host. On the CPU it changes nothing."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from orchestrator.contracts.dataset import StreamWindows


def _loaders(found) -> list:
    if found is None:
        return []
    if isinstance(found, DataLoader):
        return [found]
    if isinstance(found, dict):
        return [x for v in found.values() for x in _loaders(v)]
    if isinstance(found, (list, tuple)):
        return [x for v in found for x in _loaders(v)]
    return []


def _movable(loader: DataLoader) -> bool:
    """A stream read in this process (worker processes would start CUDA in a fork), not pinned
    (pinning takes host tensors), held as tensors."""
    ds = loader.dataset
    return (isinstance(ds, StreamWindows) and loader.num_workers == 0 and not loader.pin_memory
            and isinstance(ds.x, torch.Tensor) and isinstance(ds.y, torch.Tensor))


def _move(found, device) -> None:
    for loader in _loaders(found):
        if _movable(loader) and loader.dataset.x.device != device:
            loader.dataset.to(device)


class StreamsOnDevice(pl.Callback):
    """Moves the streams of each loop's loaders to the module's device as the loop starts (each
    training epoch: loaders may be reloaded between epochs)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _move(trainer.train_dataloader, pl_module.device)

    def on_validation_start(self, trainer, pl_module) -> None:
        _move(trainer.val_dataloaders, pl_module.device)

    def on_test_start(self, trainer, pl_module) -> None:
        _move(trainer.test_dataloaders, pl_module.device)

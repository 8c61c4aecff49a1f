"""The data of a fit kept on its device: every :class:`~orchestrator.contracts.dataset.StreamWindows`
that a training, validation or test loader reads is moved to the module's device when that loop
starts, once. A window is then a slice of a tensor already there, and Lightning's per-step
transfer of the batch has nothing to copy (two host-to-device copies a step fewer on a GPU; the
whole PTB stream is 15 MB). On the CPU it changes nothing."""

from __future__ import annotations

import pytorch_lightning as pl
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


def _move(found, device) -> None:
    for loader in _loaders(found):
        if isinstance(loader.dataset, StreamWindows) and loader.dataset.x.device != device:
            loader.dataset.to(device)


class StreamsOnDevice(pl.Callback):
    """Moves the streams of each loop's loaders to the module's device as the loop starts."""

    def on_train_start(self, trainer, pl_module) -> None:
        _move(trainer.train_dataloader, pl_module.device)

    def on_validation_start(self, trainer, pl_module) -> None:
        _move(trainer.val_dataloaders, pl_module.device)

    def on_test_start(self, trainer, pl_module) -> None:
        _move(trainer.test_dataloaders, pl_module.device)

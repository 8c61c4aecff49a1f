"""The Lightning callbacks orch adds to a fit.

- :class:`StreamsOnDevice`: every :class:`~orchestrator.contracts.dataset.StreamWindows` that a
  training, validation or test loader reads is moved to the module's device when that loop
  starts, once. A window is then a slice of a tensor already there, and Lightning's per-step
  transfer of the batch has nothing to copy (two host-to-device copies a step fewer on a GPU; the
  whole PTB stream is 15 MB). Streams read by DataLoader worker processes or pinned are left on
  the host. On the CPU it changes nothing.
- :func:`pruning`: a trial's study metric reported to Optuna after each validation, pruned when
  the pruner says so.
- :func:`interruption`: a trial's fit ends at the next step boundary once its worker is asked to
  stop (:mod:`orchestrator.execution.stopping`), after the window's checkpoint is written.
- :class:`TrainingBar`: what ``orch train`` shows while it trains: the running loss, the module's
  own reading of it (perplexity for a language model), the last validation metrics and the
  throughput. The numbers come from :meth:`SequenceModule.progress_metrics`, read only when the bar
  refreshes (every :data:`REFRESH` steps), so the bar costs one host sync per refresh, not one per step.

The checkpoint a retry resumes from is :class:`orchestrator.training.checkpoints.LastCheckpoint`.
"""

from __future__ import annotations

import signal
import sys
import threading

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader

from orchestrator import outages
from orchestrator.contracts.dataset import StreamWindows
from orchestrator.execution import lease, stopping
from orchestrator.training.checkpoints import LastCheckpoint
from orchestrator.training.resumable import ResumableLoader

#: steps between two refreshes of the training bar
REFRESH = 10


def _loaders(found) -> list:
    if found is None:
        return []
    if isinstance(found, DataLoader):
        return [found]
    if isinstance(found, ResumableLoader):
        return _loaders(found.loader)
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

    on_train_start = on_train_epoch_start  # a fit resumed between two windows starts no epoch

    def on_validation_start(self, trainer, pl_module) -> None:
        _move(trainer.val_dataloaders, pl_module.device)

    def on_test_start(self, trainer, pl_module) -> None:
        _move(trainer.test_dataloaders, pl_module.device)


def pruning(trial, metric: str) -> pl.Callback:
    """Reports ``metric`` to ``trial`` after each validation and prunes the trial when told to.

    While the storage is away (:mod:`orchestrator.outages`) the reports are kept, training goes on
    without pruning decisions, and the kept reports are written, in order, once it answers (at
    the latest by :meth:`flush`, which the trial calls after the fit).
    """
    import optuna

    class Pruning(pl.Callback):
        def __init__(self):
            self.pending: dict[int, float] = {}

        def on_validation_end(self, trainer, module):
            if trainer.sanity_checking or metric not in trainer.callback_metrics:
                return
            value = float(trainer.callback_metrics[metric])
            self.pending[trainer.current_epoch] = value
            try:
                with outages.no_wait():
                    self.flush()
                    prune = trial.should_prune()
            except outages.Unavailable:
                return  # kept; written when the storage answers
            if prune:
                raise optuna.TrialPruned(f"pruned after epoch {trainer.current_epoch} with {metric}={value:.6g}")

        def flush(self) -> None:
            """Write the kept reports, oldest first (raises what the storage raises)."""
            _check_lease()
            for step in sorted(self.pending):
                trial.report(self.pending[step], step)
                del self.pending[step]

    return Pruning()


def _check_lease() -> None:
    """Raise :class:`TrialLost` if another process took this worker's trial over."""
    held = lease.current()
    if held is not None and not held.may_write():
        raise lease.TrialLost(f"trial {held.number} was declared lost by another process")


class Interruption(pl.Callback):
    """Ends the fit at the next step boundary once a stop was requested, the trial was found lost,
    or a store has been away for longer than its outage window."""

    def _check(self, *args) -> None:
        signum = stopping.requested()
        if signum is not None:
            raise stopping.TrialInterrupted(f"stopped by {signal.Signals(signum).name}")
        held = lease.current()
        if held is not None and held.lost:
            raise lease.TrialLost("declared lost by another process")
        outages.check_all()

    def _check_writable(self, *args) -> None:
        """Before an epoch's writes (its checkpoint, its metrics): the full check of the lease."""
        self._check()
        _check_lease()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if stopping.requested() is not None:  # a stop that came after the checkpoint callback ran: its checkpoint first
            for callback in trainer.callbacks:
                if isinstance(callback, LastCheckpoint):
                    callback.save_window(trainer, batch_idx)
        self._check()

    on_validation_batch_end = _check
    on_train_epoch_start = on_validation_end = _check_writable

    def on_train_start(self, trainer, module) -> None:
        # Lightning's own SIGTERM handler ends the fit at the end of the step in which the signal
        # came, after this step's callbacks ran: a stop then would skip its window checkpoint. Where
        # SIGTERM raises orch's stop flag (a worker), the flag alone decides, at the next step's end.
        original = getattr(trainer._signal_connector, "_original_handlers", {}).get(signal.SIGTERM)
        if original is stopping.request and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, stopping.request)  # Lightning's teardown puts it back as it was


def interruption() -> pl.Callback:
    return Interruption()


def _on_stderr(init):
    """Lightning draws its bars on stdout; orch keeps stdout for results (``orch train > out.json``)."""
    def on_stderr(self):
        out, sys.stdout = sys.stdout, sys.stderr
        try:
            return init(self)
        finally:
            sys.stdout = out
    return on_stderr


class TrainingBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = REFRESH):
        super().__init__(refresh_rate=refresh_rate)

    init_sanity_tqdm = _on_stderr(TQDMProgressBar.init_sanity_tqdm)
    init_train_tqdm = _on_stderr(TQDMProgressBar.init_train_tqdm)
    init_validation_tqdm = _on_stderr(TQDMProgressBar.init_validation_tqdm)
    init_test_tqdm = _on_stderr(TQDMProgressBar.init_test_tqdm)

    def get_metrics(self, trainer, pl_module) -> dict[str, int | str | float | dict[str, float]]:
        items: dict = {}
        reading = getattr(pl_module, "progress_metrics", None)
        if reading is not None:
            items.update(reading())
        for key, value in trainer.callback_metrics.items():  # the last validation's metrics
            if key.startswith("val_"):
                items[key] = f"{float(value):.4g}"
        return items

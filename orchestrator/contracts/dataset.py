"""Contract for ``orch.datasets`` plugins: a LightningDataModule that describes itself.

A dataset plugin subclasses :class:`SequenceDataModule`, takes its settings as keyword
arguments (the study file's ``dataset`` section) and implements :meth:`~SequenceDataModule.describe`
plus the usual ``train_dataloader`` / ``val_dataloader`` / ``test_dataloader``.

Batches are ``(x, y)``:

* ``language_model``: ``x`` and ``y`` are token ids ``[B, T]`` (``y`` is ``x`` shifted by one).
* ``step_regression``: ``x`` is ``[B, T, input_size]`` floats, ``y`` is ``[B, T]`` floats.
* ``step_classification``: ``x`` is ``[B, T, input_size]`` floats, ``y`` is ``[B, T]`` class ids.

With ``layout="stream"`` the batches of one dataloader are consecutive windows of the same
``B`` contiguous rows (row r of batch k+1 continues row r of batch k; see :class:`StreamWindows`),
so the module carries its state from batch to batch. With ``layout="sequences"`` every batch
holds independent sequences and the state starts fresh for each batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

TASKS = ("language_model", "step_regression", "step_classification")


class DataUnavailable(RuntimeError):
    """Raised by a dataset whose data is not on this machine (missing files, no download): orch then
    reports the plugin as needing data instead of broken."""
LAYOUTS = ("stream", "sequences")


@dataclass(frozen=True)
class DatasetInfo:
    """What a module needs to know about its data.

    Attributes:
        task: one of ``language_model``, ``step_regression``, ``step_classification``.
        layout: ``stream`` (state carried across batches) or ``sequences`` (fresh per batch).
        vocab_size: number of token ids (language models).
        input_size: features per step (step tasks).
        num_classes: classes per step (step classification).
        val_sets: a name per validation dataloader, in order; metrics are logged as
            ``{name}_{metric}`` (for example ``val_acc``, ``long_acc``).
        test_sets: a name per test dataloader, in order.
        bptt: window length for ``sequences`` layout: longer sequences are cut into windows of
            this many steps with the state carried across them (``None``: whole sequences).
    """

    task: str
    layout: str
    vocab_size: int | None = None
    input_size: int | None = None
    num_classes: int | None = None
    val_sets: tuple[str, ...] = ("val",)
    test_sets: tuple[str, ...] = ("test",)
    bptt: int | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")


class SequenceDataModule(pl.LightningDataModule):
    """Base class of dataset plugins."""

    def describe(self) -> DatasetInfo:
        """Return the :class:`DatasetInfo` for this dataset (may load or generate the data)."""
        raise NotImplementedError


class StreamWindows(Dataset):
    """Consecutive TBPTT windows over a stream cut into ``batch_size`` contiguous rows.

    The stream (``inputs[i]`` with ``targets[i]``) is trimmed to a multiple of ``batch_size``
    and reshaped to ``[batch_size, N]`` so that row r holds the r-th contiguous slice. Item k is
    the window of columns ``[k*bptt, (k+1)*bptt)`` of every row (the last window may be shorter).
    Use it with ``DataLoader(ds, batch_size=None, shuffle=False)``.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, bptt: int):
        if len(inputs) != len(targets):
            raise ValueError("inputs and targets must have the same length")
        if batch_size < 1 or bptt < 1:
            raise ValueError(f"batch_size and bptt must be >= 1 (got {batch_size}, {bptt})")
        n = len(inputs) // batch_size
        if n < 1:
            raise ValueError(f"a stream of {len(inputs)} steps cannot fill {batch_size} rows")
        self.x = inputs[: n * batch_size].reshape(batch_size, n, *inputs.shape[1:])
        self.y = targets[: n * batch_size].reshape(batch_size, n, *targets.shape[1:])
        self.bptt = bptt
        self.row_len = n

    def __len__(self) -> int:
        return -(-self.row_len // self.bptt)

    def __getitem__(self, k: int):
        if not 0 <= k < len(self):
            raise IndexError(k)
        cols = slice(k * self.bptt, (k + 1) * self.bptt)
        return self.x[:, cols], self.y[:, cols]

    def to(self, device: torch.device | str) -> StreamWindows:
        """Move the whole stream to ``device`` once: each window is then a slice there, not a copy
        from the host per step (orch does it for every stream a fit reads, on its device)."""
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

"""A training loader that a checkpoint can stop and continue in the middle of an epoch.

Lightning saves and loads the state of a training loader that has ``state_dict``/``load_state_dict``
(and warns that a mid-epoch resume of any other is unreliable). :class:`ResumableLoader` wraps the
loader a datamodule returns and gives it that state: the random states the epoch started from
(torch's global generator, which a shuffling sampler or the loader's worker seeds draw from, and
the loader's own ``generator``, e.g. ``sum_game``'s reproducible shuffle), and the windows of the
epoch already trained (``position``, set by the checkpoint before it is saved; ``None`` at an
epoch's end).

A loader resumed in the middle of an epoch starts that epoch again from the same random states
(the same order), skips the windows already trained, and sets torch's generator as it was when
the checkpoint was saved; one resumed at an epoch's end starts the next epoch from torch's and the
loader's generators as they were then. Either way the windows come in the order of the run that
was never stopped. The loader, the last to draw before training, sets torch's generator itself:
whatever else drew from it since the checkpoint was loaded does not matter. Nothing is drawn
until the first window is asked for (Lightning calls ``iter()`` once just to check that a loader
is iterable). Skipping reads the skipped windows (for orch's in-memory datasets, a slice each).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader


class ResumableLoader:
    """``loader`` (any sized iterable, usually a :class:`~torch.utils.data.DataLoader`) with the
    state Lightning saves in a checkpoint and loads on a resume."""

    def __init__(self, loader):
        self.loader = loader
        #: windows of the current epoch trained when the checkpoint is saved (``None``: an epoch's end)
        self.position: int | None = None
        self._start: dict[str, Any] | None = None  # the random states the current epoch started from
        self._resume: dict[str, Any] | None = None

    def _generator(self) -> torch.Generator | None:
        return self.loader.generator if isinstance(self.loader, DataLoader) else None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        # lazily: a DataLoader's iterator draws its seed from the loader's generator when it is made
        yield from self._begin()

    def _begin(self):
        gen = self._generator()
        resume, self._resume = self._resume, None
        if resume is not None and not resume.get("position"):  # saved at an epoch's end: the next epoch
            if gen is not None and resume.get("generator") is not None:
                gen.set_state(resume["generator"])
            torch.set_rng_state(resume["torch"])  # whatever Lightning drew since it was restored
            resume = None
        if resume is None:
            self._start = {"torch": torch.get_rng_state(), "generator": gen.get_state() if gen is not None else None}
            return iter(self.loader)
        self._start = resume["start"]
        torch.set_rng_state(self._start["torch"])
        if gen is not None and self._start.get("generator") is not None:
            gen.set_state(self._start["generator"])
        it = iter(self.loader)
        skipped = 0
        others = random.getstate(), np.random.get_state()  # as the checkpoint restored them
        for _ in range(int(resume["position"])):
            if next(it, _END) is _END:
                break
            skipped += 1
        random.setstate(others[0])
        np.random.set_state(others[1])
        torch.set_rng_state(resume["torch"])  # as it was after the windows already trained
        if skipped != int(resume["position"]):
            raise RuntimeError(f"the checkpoint was saved after {resume['position']} training windows of an epoch, "
                               f"but the training loader now has {skipped}: it is not the loader it was saved with")
        return it

    def state_dict(self) -> dict[str, Any]:
        gen = self._generator()
        return {"start": self._start, "position": self.position, "torch": torch.get_rng_state(),
                "generator": gen.get_state() if gen is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state


_END = object()


def resumable(datamodule) -> None:
    """Make ``datamodule.train_dataloader()`` return its DataLoader in a :class:`ResumableLoader`
    (once; for a fit on one device: Lightning gives only a DataLoader itself a distributed sampler)."""
    original = datamodule.train_dataloader
    if getattr(original, "_orch_resumable", False):
        return

    def train_dataloader():
        loader = original()  # several loaders (a dict, a list) are left as they are: no window checkpoints
        return ResumableLoader(loader) if isinstance(loader, DataLoader) else loader

    train_dataloader._orch_resumable = True
    datamodule.train_dataloader = train_dataloader

"""Contract checks for ``orch.modules`` plugins: ``check_module(MyModule, **settings)``.

The module is built around a small reference LSTM cell and trained for two epochs of three
windows on a toy stream of each task it declares, with one validation window, in a real
Lightning ``Trainer`` on the CPU. Rules (each failure a
:class:`~orchestrator.testing.rules.ContractError` with a fix):

- ``module.contract``: a subclass of :class:`~orchestrator.contracts.module.SequenceModule`
  declaring the tasks it trains (``tasks``, among ``language_model``, ``step_regression``,
  ``step_classification``);
- ``module.settings``: its settings pass orch's own validation;
- ``module.build``: it builds from ``cell=``, ``info=`` and its settings, with the cell as ``self.cell``;
- ``module.forward``: ``forward(x, state)`` returns ``(pred, state)`` and ``loss`` a finite scalar;
- ``module.fit``: a training epoch and a validation run complete, logging ``train_loss`` and the
  validation metrics as ``{val set}_{metric}``;
- ``module.carries_state``: in a stream, every window starts from the state the window before
  ended with (detached), and every epoch from the cell's initial state;
- ``module.deterministic``: two fits under one seed log the same training loss;
- ``module.resumable``: a fit checkpointed between two windows, stopped and resumed, trains
  exactly (within 1e-6) like one never stopped (a preempted trial's retry continues at the next
  window: a module's own per-epoch state goes in ``window_state()``/``restore_window()``).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from orchestrator.contracts.cell import Cell, map_state
from orchestrator.contracts.dataset import TASKS, DatasetInfo, StreamWindows
from orchestrator.contracts.module import CellSpec, SequenceModule
from orchestrator.testing.rules import require, rule
from orchestrator.testing.settings import check_settings
from orchestrator.training.checkpoints import LAST, LastCheckpoint
from orchestrator.training.quiet import quiet_lightning
from orchestrator.training.resumable import ResumableLoader

STATE_FIX = ("train through SequenceModule.run_batch (or keep its rule): carry the state from window to "
             "window, detached, and reset it at each epoch start")


class ReferenceCell(Cell):
    """``torch.nn.LSTM`` as a cell: what modules are checked with."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout)
        self.rnn = torch.nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)

    def init_state(self, batch_size, device=None):
        shape = (self.num_layers, batch_size, self.hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def forward(self, x, state):
        out, (h, c) = self.rnn(x, state)
        return out, (h, c)


def toy_data(task: str, rows: int = 2, bptt: int = 5, windows: int = 3):
    """A stream for ``task``: its :class:`DatasetInfo`, and training and validation loaders."""
    g = torch.Generator().manual_seed(0)
    n = rows * bptt * windows + 1
    if task == "language_model":
        tokens = torch.randint(0, 7, (n,), generator=g)
        info = DatasetInfo(task=task, layout="stream", vocab_size=7)
        inputs, targets = tokens[:-1], tokens[1:]
    elif task == "step_regression":
        inputs = torch.randn(n - 1, 2, generator=g)
        targets = inputs[:, 0].cumsum(0)
        info = DatasetInfo(task=task, layout="stream", input_size=2)
    else:
        bits = torch.randint(0, 2, (n,), generator=g)
        inputs, targets = bits[1:].float().unsqueeze(-1), bits[:-1]
        info = DatasetInfo(task=task, layout="stream", input_size=1, num_classes=2)
    train = DataLoader(StreamWindows(inputs, targets, rows, bptt), batch_size=None, shuffle=False)
    val = DataLoader(StreamWindows(inputs[: rows * bptt], targets[: rows * bptt], rows, bptt), batch_size=None,
                     shuffle=False)
    return info, train, val


def _build(cls, info, settings):
    with rule("module.build", "accept cell=, info= and your settings as keyword arguments, build the cell "
                              "with cell.build(input_size) as self.cell, and call SequenceModule.__init__"):
        torch.manual_seed(0)
        module = cls(cell=CellSpec("reference", ReferenceCell, {"hidden_size": 6}), info=info, **settings)
    require(isinstance(getattr(module, "cell", None), Cell), "module.build", "the module has no self.cell",
            "store the built cell as self.cell: orch's state handling uses it")
    return module


def _fit(module, train, val, epochs: int = 2):
    quiet_lightning(logging.ERROR)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=1, deterministic=True)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _spy(module) -> list:
    """Record, for every training window, the state passed in and the state passed out."""
    calls: list = []
    forward = module.forward

    def spy(x, state):
        pred, new = forward(x, state)
        if module.training:
            calls.append((module.current_epoch, map_state(lambda t: t.detach().clone(), state),
                          [t.requires_grad for t in _leaves(state)], map_state(lambda t: t.detach().clone(), new)))
        return pred, new

    module.forward = spy
    return calls


def _leaves(state) -> list:
    out: list = []
    map_state(out.append, state)
    return out


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))


class _Losses(pl.Callback):
    def __init__(self, stop_after: int | None = None):
        self.losses: list[float] = []
        self.stop_after = stop_after

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        if len(self.losses) == self.stop_after:
            raise _Preempted


class _Preempted(Exception):
    pass


def _resumes_exactly(cls, info, settings, train, val) -> None:
    """A fit checkpointed between two windows, stopped there and resumed in a new trainer trains
    exactly like the fit never stopped (rule ``module.resumable``)."""
    def fit(callbacks, ckpt=None):
        module = _build(cls, info, settings)
        torch.manual_seed(0)
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             deterministic=True, callbacks=callbacks)
        trainer.fit(module, train_dataloaders=ResumableLoader(train), val_dataloaders=val, ckpt_path=ckpt,
                    weights_only=True)

    quiet_lightning(logging.ERROR)
    reference, first, second = _Losses(), _Losses(stop_after=len(train) + 2), _Losses()
    fit([reference])
    with tempfile.TemporaryDirectory(prefix="orch-check-") as tmp:
        with contextlib.suppress(_Preempted):  # after the second window of the second epoch
            fit([LastCheckpoint(Path(tmp), "check", every_windows=1), first])
        fit([LastCheckpoint(Path(tmp), "check"), second], ckpt=str(Path(tmp) / LAST))
    got, want = first.losses + second.losses, reference.losses
    require(len(got) == len(want) and all(abs(a - b) <= 1e-6 for a, b in zip(got, want)),
            "module.resumable", f"stopped after window {len(first.losses)} and resumed, the training losses were "
            f"{[round(v, 6) for v in second.losses]}; without the stop "
            f"{[round(v, 6) for v in want[len(first.losses):]]}",
            "keep any per-epoch state of your own in window_state() (return {**super().window_state(), ...}) and "
            "take it back in restore_window(); draw randomness only from torch's generator")


def check_module(cls: type[SequenceModule], **settings) -> None:
    """Run every module rule on ``cls`` for each task it declares."""
    require(isinstance(cls, type) and issubclass(cls, SequenceModule), "module.contract",
            f"{cls!r} is not a subclass of orchestrator.contracts.module.SequenceModule", "subclass SequenceModule")
    tasks = tuple(getattr(cls, "tasks", ()))
    require(bool(tasks) and set(tasks) <= set(TASKS), "module.contract",
            f"tasks = {tasks!r}: declare the tasks the module trains, among {TASKS}", "set the class attribute tasks")
    checked = check_settings(cls, "module", settings)
    for task in tasks:
        info, train, val = toy_data(task)
        module = _build(cls, info, checked)
        x, _ = next(iter(train))
        with rule("module.forward", "forward(x, state) must return (predictions, new_state), and loss(pred, y) "
                                    "a scalar tensor"):
            pred, _ = module(x, module.cell.init_state(x.shape[0], "cpu"))
            loss = module.loss(pred, next(iter(train))[1])
        require(loss.dim() == 0 and bool(torch.isfinite(loss)), "module.forward",
                f"loss is {tuple(loss.shape)} {loss}", "return the mean loss per element as a scalar")
        calls = _spy(module)
        with rule("module.fit", "training_step/validation_step must run on the dataset's (x, y) windows; keep "
                                "SequenceModule's hooks or call super()"):
            metrics = _fit(module, train, val)
        require("train_loss" in metrics, "module.fit", f"no train_loss was logged; logged: {sorted(metrics)}",
                "keep SequenceModule.on_train_epoch_end (or log train_loss yourself)")
        require(any(k.startswith(f"{info.val_sets[0]}_") for k in metrics), "module.fit",
                f"no {info.val_sets[0]}_* metric was logged; logged: {sorted(metrics)}",
                "keep SequenceModule's evaluation hooks and summarize()")
        declared = {f"{info.val_sets[0]}_{m}" for m in getattr(cls, "metrics", ())}
        found = {k for k in metrics if k.startswith(f"{info.val_sets[0]}_")}
        require(declared == found, "module.metrics",
                f"metrics = {tuple(getattr(cls, 'metrics', ()))!r}, but summarize() logged "
                f"{sorted(k.removeprefix(info.val_sets[0] + '_') for k in found)}",
                "declare in the class attribute metrics exactly the keys summarize() returns (a study's "
                "study.metric is checked against them)")
        initial = module.cell.init_state(x.shape[0], "cpu")
        for (epoch, state_in, grads, _), previous in zip(calls, [None, *calls]):
            if previous is None or previous[0] != epoch:
                require(_equal(state_in, initial), "module.carries_state",
                        f"epoch {epoch} did not start from the cell's initial state", STATE_FIX)
            else:
                require(_equal(state_in, previous[3]), "module.carries_state",
                        f"a window of epoch {epoch} did not start from the state the window before ended with",
                        STATE_FIX)
                require(not any(grads), "module.carries_state",
                        "the carried state still requires grad: it was not detached at the window boundary",
                        STATE_FIX)
        losses = []
        for _ in range(2):
            fresh = _build(cls, info, checked)
            torch.manual_seed(0)
            losses.append(_fit(fresh, train, val)["train_loss"])
        require(losses[0] == losses[1], "module.deterministic",
                f"two fits under one seed: train_loss {losses[0]} vs {losses[1]}",
                "draw randomness only from torch's generator (seeded by orch)")
        _resumes_exactly(cls, info, checked, train, val)


__all__ = ["check_module", "ReferenceCell", "toy_data"]

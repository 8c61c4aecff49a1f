"""Contract for ``orch.modules`` plugins, and orch's stateful truncated BPTT.

Lightning 2.x has no built-in TBPTT; :class:`SequenceModule` provides it. A module plugin
subclasses it, declares the ``tasks`` it can train, builds its layers in ``__init__`` and
implements four small hooks:

* :meth:`~SequenceModule.forward` ``(x, state) -> (pred, state)``
* :meth:`~SequenceModule.loss` ``(pred, y) -> mean loss per element``
* :meth:`~SequenceModule.accumulate` ``(acc, pred, y, loss)`` adds sums for the eval metrics
* :meth:`~SequenceModule.summarize` ``(acc) -> {metric: value}``

State semantics (the same for every module):

* training, ``stream`` layout: the state is carried from one batch to the next, detached at
  each window boundary, and reset at the start of every epoch;
* validation and test keep their own state per dataloader, reset at the start of each run,
  so evaluation never disturbs the training state;
* ``sequences`` layout: the state starts fresh for each batch; sequences longer than the
  dataset's ``bptt`` are cut into windows with the state carried (and, in training, detached).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pytorch_lightning as pl
import torch

from orchestrator.contracts.cell import Cell, State, detach_state, map_state
from orchestrator.contracts.dataset import DatasetInfo
from orchestrator.contracts.settings import Index, LearningRate, NonNegative, Positive

#: the optimisers a :class:`SequenceModule` builds
Optimizer = Literal["sgd", "adam"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class CellSpec:
    """A cell plugin with its settings; the module chooses the ``input_size`` when building it."""

    name: str
    cls: type[Cell]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.settings["hidden_size"])

    def build(self, input_size: int) -> Cell:
        return self.cls(input_size=input_size, **self.settings)


#: what every module logs at the end of each training epoch
TRAINING_METRICS = ("train_loss", "lr", "tokens_per_s")


def logged_metrics(module_cls: type, val_sets: tuple[str, ...]) -> tuple[str, ...]:
    """Every metric a run of ``module_cls`` logs each epoch, given its dataset's validation sets."""
    return TRAINING_METRICS + tuple(f"{s}_{m}" for s in val_sets for m in getattr(module_cls, "metrics", ()))


class SequenceModule(pl.LightningModule):
    """Base class of module plugins: stateful TBPTT training with per-epoch metrics.

    Args:
        cell: the cell plugin to build (``cell.build(input_size)``).
        info: the dataset's description.
        lr: learning rate.
        optimizer: ``sgd`` or ``adam``.
        weight_decay: L2 penalty passed to the optimizer.
        clip_grad_norm: clip the global gradient norm to this (``None``: no clipping).
        lr_decay: multiply the learning rate by this once per epoch ...
        decay_after: ... for every epoch after the first ``decay_after`` epochs (Zaremba et al.).
        init_scale: initialise every weight uniformly in ``±init_scale`` (``None``: defaults).
        nan_check_every: check the training loss for NaN/inf every this many steps.
        cuda_graphs: on a CUDA device, replay every full training window of a stream as a CUDA
            graph (:mod:`orchestrator.training.graphs`; 1.6x the tokens per second of eager on the PTB
            medium model); elsewhere, and for other windows, it changes nothing.
    """

    #: Tasks (see :data:`orchestrator.contracts.dataset.TASKS`) this module can train.
    tasks: ClassVar[tuple[str, ...]] = ()
    #: The metrics :meth:`summarize` returns, logged as ``{eval set}_{metric}`` at each evaluation; a
    #: study's ``study.metric`` must be one of them (or one of :data:`TRAINING_METRICS`), checked
    #: before anything runs, and ``orchestrator.testing.check_module`` checks the declaration.
    metrics: ClassVar[tuple[str, ...]] = ("loss",)

    def __init__(self, cell: CellSpec, info: DatasetInfo, lr: LearningRate = 1e-3, optimizer: Optimizer = "adam",
                 weight_decay: NonNegative = 0.0, clip_grad_norm: Positive | None = None, lr_decay: Positive = 1.0,
                 decay_after: Index = 0, init_scale: Positive | None = None, nan_check_every: Index = 25,
                 cuda_graphs: bool = True):
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if info.task not in self.tasks:
            raise ValueError(f"{type(self).__name__} trains {self.tasks}, not {info.task!r}")
        self.info = info
        self.lr = lr
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.clip = clip_grad_norm
        self.lr_decay = lr_decay
        self.decay_after = decay_after
        self.init_scale = init_scale
        self.nan_check_every = nan_check_every
        self.cuda_graphs = cuda_graphs
        self._graphs = None  # orchestrator.training.graphs.WindowGraphs, made at the first full CUDA window
        self._states: dict[str, State] = {}
        self._acc: dict[str, dict[str, Any]] = {}
        self._train_loss_sum: torch.Tensor | None = None
        self._train_steps = 0
        self._train_elems = 0
        self._epoch_t0 = 0.0
        self._eval_t0: float | None = None
        self._paused = 0.0  # seconds of validation inside the current training epoch
        self._window: dict[str, Any] | None = None  # restore_window's state, for the next epoch start

    # ---- hooks for subclasses -------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Predictions for a window ``x`` starting from ``state``; returns ``(pred, state)``."""
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss per element (per token or per step) of a window."""
        raise NotImplementedError

    def training_loss(self, loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The quantity to backpropagate, from the mean loss (default: the mean loss itself)."""
        return loss

    def accumulate(self, acc: dict[str, Any], pred: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        """Add the sums an eval metric needs to ``acc`` (a ``defaultdict(float)`` per eval set)."""
        n = y.numel()
        acc["loss_sum"] += loss.detach() * n
        acc["n"] += n

    def summarize(self, acc: dict[str, Any]) -> dict[str, float]:
        """Turn ``acc`` into metrics, logged as ``{eval set}_{metric}``."""
        return {"loss": float(acc["loss_sum"]) / max(acc["n"], 1)}

    # ---- state ----------------------------------------------------------------------------
    def _window_state(self, key: str, batch_size: int) -> State:
        state = self._states.get(key)
        if state is None:
            state = self.cell.init_state(batch_size, self.device)
        return state

    def run_batch(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """Predictions for one batch, with the state handling described in the module docstring."""
        if self.info.layout == "stream":
            pred, state = self(x, self._window_state(key, x.shape[0]))
            self._states[key] = detach_state(state)
            return pred
        state = self.cell.init_state(x.shape[0], self.device)
        win = self.info.bptt or x.shape[1]
        preds = []
        for start in range(0, x.shape[1], win):
            pred, state = self(x[:, start:start + win], state)
            preds.append(pred)
            if self.training:
                state = detach_state(state)
        return preds[0] if len(preds) == 1 else torch.cat(preds, dim=1)

    def reset_states(self, prefix: str) -> None:
        for key in [k for k in self._states if k.startswith(prefix)]:
            del self._states[key]

    # ---- resuming in the middle of an epoch -----------------------------------------------
    def window_state(self) -> dict[str, Any]:
        """What the rest of the current training epoch needs besides the weights, the optimiser and
        the random generators, saved in a checkpoint taken between two training windows: the carried
        training state of every stream and the epoch's running sums. A subclass that keeps more
        per-epoch state of its own adds it (``{**super().window_state(), "mine": ...}``: tensors,
        numbers, strings and their lists, tuples and dicts) and takes it back in
        :meth:`restore_window`; ``orchestrator.testing.check_module`` checks that a resumed epoch
        trains exactly as one never stopped."""
        return {"states": {k: v for k, v in self._states.items() if k.startswith("train")},
                "loss_sum": self._train_loss_sum, "steps": self._train_steps, "elems": self._train_elems,
                "elapsed": time.perf_counter() - self._epoch_t0 - self._paused}

    def restore_window(self, state: dict[str, Any]) -> None:
        """Take back :meth:`window_state` when a fit resumes in the middle of an epoch (called while
        the checkpoint is loaded; :meth:`on_train_start` applies it, since Lightning does not start
        that epoch again)."""
        self._window = state

    # ---- training -------------------------------------------------------------------------
    def on_train_start(self) -> None:
        # Lightning resumes a fit saved between two windows without calling on_train_epoch_start
        window, self._window = self._window, None
        if window is not None:
            self._states.update({k: map_state(lambda t: t.to(self.device), v) for k, v in window["states"].items()})
            self._train_loss_sum = torch.as_tensor(window["loss_sum"], device=self.device).clone()
            self._train_steps, self._train_elems = int(window["steps"]), int(window["elems"])
            self._paused = 0.0
            self._epoch_t0 = time.perf_counter() - float(window["elapsed"])

    def on_train_epoch_start(self) -> None:
        self.reset_states("train")
        self._train_loss_sum = torch.zeros((), device=self.device)
        self._train_steps = 0
        self._train_elems = 0
        self._paused = 0.0
        self._epoch_t0 = time.perf_counter()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self._graphed_window(x, y) if self.cuda_graphs else None
        if loss is None:
            loss = self.loss(self.run_batch(x, "train"), y)
        self._train_loss_sum += loss.detach()
        self._train_steps += 1
        self._train_elems += y.numel()
        if self.nan_check_every and self._train_steps % self.nan_check_every == 0:
            self._check_finite()
        return self.training_loss(loss, x)

    def _graphed_window(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The mean loss of a training window from its CUDA graph, the state carried as in
        :meth:`run_batch`; ``None`` where the window runs eagerly."""
        if self.info.layout != "stream" or not x.is_cuda:
            return None
        if getattr(self._trainer, "accumulate_grad_batches", 1) != 1 or \
                type(self).optimizer_zero_grad is not pl.LightningModule.optimizer_zero_grad:
            # a parameter's .grad is the graph's gradient buffer, rewritten by the next replay: it must
            # be set to None between steps (Lightning's default), never kept or zeroed in place
            return None
        if self._graphs is None:
            from orchestrator.training.graphs import WindowGraphs

            self._graphs = WindowGraphs(self)
        if not self._graphs.usable(x):
            return None
        out = self._graphs.step(x, y, self._window_state("train", x.shape[0]))
        if out is None:
            return None
        loss, state = out
        self._states["train"] = detach_state(state)
        return loss

    def on_fit_end(self) -> None:
        # frees the graphs' memory pool with the fit (a later fit, its parameters moved to the
        # device again, would recapture anyway: the graphs check their parameters' addresses)
        self._graphs = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_graphs"] = None  # a copy or a pickle never shares (or carries) the captured graphs
        return state

    def _check_finite(self) -> None:
        value = float(self._train_loss_sum)
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"train_loss became {value} in epoch {self.current_epoch} by step {self._train_steps}")

    #: what one training element is, for the throughput the progress bar shows (``tok/s``)
    unit: ClassVar[str] = "tok"

    def reading(self, loss: float) -> dict[str, float]:
        """More numbers the progress bar derives from the running mean training loss (e.g. perplexity)."""
        return {}

    def progress_metrics(self) -> dict[str, str]:
        """The running mean training loss of the epoch, :meth:`reading` of it, and the throughput."""
        if not self._train_steps:
            return {}
        loss = float(self._train_loss_sum) / self._train_steps
        elapsed = max(time.perf_counter() - self._epoch_t0 - self._paused, 1e-9)
        return {"loss": f"{loss:.4g}", **{k: f"{v:.4g}" for k, v in self.reading(loss).items()},
                f"{self.unit}/s": f"{self._train_elems / elapsed:,.0f}"}

    def on_train_epoch_end(self) -> None:
        if not self._train_steps:
            return
        self._check_finite()
        elapsed = max(time.perf_counter() - self._epoch_t0 - self._paused, 1e-9)
        self.log_dict({
            "train_loss": float(self._train_loss_sum) / self._train_steps,
            "lr": self.optimizers().param_groups[0]["lr"],
            "tokens_per_s": self._train_elems / elapsed,  # training time only, validation excluded
        })

    # ---- evaluation -----------------------------------------------------------------------
    def _eval_start(self, split: str, names: tuple[str, ...]) -> None:
        self._eval_t0 = time.perf_counter()
        self.reset_states(split)
        for name in names:
            self._acc[name] = defaultdict(float)

    def _eval_step(self, split: str, names: tuple[str, ...], batch, dataloader_idx: int) -> None:
        x, y = batch
        pred = self.run_batch(x, f"{split}{dataloader_idx}")
        self.accumulate(self._acc[names[dataloader_idx]], pred, y, self.loss(pred, y))

    def _eval_end(self, names: tuple[str, ...]) -> None:
        if self._eval_t0 is not None:
            self._paused += time.perf_counter() - self._eval_t0
            self._eval_t0 = None
        metrics = {}
        for name in names:
            acc = self._acc.pop(name)
            if acc["n"]:
                metrics.update({f"{name}_{k}": v for k, v in self.summarize(acc).items()})
        if metrics:
            self.log_dict(metrics)

    def on_validation_epoch_start(self) -> None:
        self._eval_start("val", self.info.val_sets)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step("val", self.info.val_sets, batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_end(self.info.val_sets)

    def on_test_epoch_start(self) -> None:
        self._eval_start("test", self.info.test_sets)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step("test", self.info.test_sets, batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_end(self.info.test_sets)

    # ---- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        decay, after = self.lr_decay, self.decay_after
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: decay ** max(epoch + 1 - after, 0))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # the module's clip_grad_norm, unless the Trainer's gradient_clip_val/algorithm are set
        if gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif self.clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")

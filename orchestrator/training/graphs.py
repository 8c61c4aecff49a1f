"""The training window of stateful TBPTT replayed as a CUDA graph (``module.cuda_graphs``, on by default).

On a GPU a TBPTT window of the PTB models is a few hundred small kernels (a 35-step recurrence
in two layers, forward and backward), and the time a step takes is mostly their launches. Every
full training window has the same shape, so its forward pass and loss, and their backward pass,
are captured once (``torch.cuda.make_graphed_callables``) and replayed for every later window:
one launch each way instead of hundreds. The optimiser step and gradient clipping stay eager.

What stays as it was:

* the state is carried from window to window and detached at each boundary (the graph's state
  outputs are copied into its static inputs before the next replay);
* the last, shorter window of an epoch, evaluation, and anything not on a CUDA device run eagerly;
* dropout draws fresh numbers on every replay (CUDA graphs advance the generator's offset);
* under ``trainer.precision: bf16-mixed`` the capture runs under the same autocast, without
  autocast's weight cache (CUDA graphs cannot use it).

A capture that fails (a cell whose forward synchronises with the host, say) is reported once as a
warning and that fit goes on eagerly. What is captured is replayed as it was: a forward whose
work depends on Python state that changes during training (a step counter, a schedule) must run
with ``module.cuda_graphs: false``.

Measured on an H200 (``benchmarks/fastpath.py``, 2026-11-26): a PTB epoch of the 2x650 LSTM in
5.2 s against 8.2 s eager and 6.6 s for a plain PyTorch loop; 3.8 s with bf16 autocast.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn
from torch.utils import _pytree as pytree


class _Window(nn.Module):
    """``(x, y, *state) -> (mean loss, *state)`` of a module, as the callable that is captured.

    The module is held as a child so that its parameters are the graph's parameters. The module
    holds the graphs in turn (a reference cycle): :meth:`SequenceModule.on_fit_end` drops them, so
    the graph's memory pool is freed with the fit that made it, not at the next garbage collection.
    """

    def __init__(self, module, treedef, autocast_dtype):
        super().__init__()
        self.module = module
        self.treedef = treedef
        self.autocast_dtype = autocast_dtype

    def forward(self, x, y, *flat_state):
        state = pytree.tree_unflatten(list(flat_state), self.treedef)
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            pred, state = self.module(x, state)
            loss = self.module.loss(pred, y)
        return (loss, *pytree.tree_leaves(state))


class WindowGraphs:
    """The captured training windows of one module, one per window shape (in practice: one)."""

    def __init__(self, module):
        self._module_ref = weakref.ref(module)  # not an attribute nn.Module would register
        self._graphs: dict[tuple, nn.Module] = {}
        self._addresses: tuple[int, ...] = ()  # of the parameters the graphs read and write
        self.failed: str | None = None
        self.width = 0  # the widest window seen: narrower ones are an epoch's last, run eagerly

    def usable(self, x: torch.Tensor) -> bool:
        """A full-width window, and no failed capture in this fit."""
        if self.failed is not None or x.shape[1] < self.width:
            return False
        self.width = x.shape[1]
        addresses = tuple(p.data_ptr() for p in self._module_ref().parameters())
        if addresses != self._addresses:  # the parameters moved (.to(), a reload): the graphs point at old memory
            self._graphs.clear()
            self._addresses = addresses
        return True

    def step(self, x: torch.Tensor, y: torch.Tensor, state):
        """``(loss, new state)`` of one training window, from the graph; ``None``: run it eagerly."""
        flat, treedef = pytree.tree_flatten(state)
        key = (tuple(x.shape), tuple(y.shape), tuple((t.shape, t.dtype) for t in flat),
               torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda"))
        graphed = self._graphs.get(key)
        if graphed is None:
            graphed = self._capture(key, x, y, flat, treedef)
            if graphed is None:
                return None
        out = graphed(x, y, *flat)
        return out[0], pytree.tree_unflatten(list(out[1:]), treedef)

    def _capture(self, key, x, y, flat, treedef):
        module = self._module_ref()
        dtype = key[-1] or None
        window = _Window(module, treedef, dtype)
        # the sample tensors become the graph's static inputs, which every replay overwrites: copies,
        # never the stream's own memory (a window is a view of it) or the carried state
        sample = (x.clone(), y.clone(), *(t.detach().clone() for t in flat))
        # warm-up runs on a side stream, so autograd notes that the parameters' gradient nodes
        # were made on another stream: expected here, and the replayed losses equal eager ones
        warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")
        try:
            with torch.autocast("cuda", enabled=False, cache_enabled=False):
                graphed = torch.cuda.make_graphed_callables(window, sample, allow_unused_input=True)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
            self.failed = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"cuda_graphs: capturing the training window failed, training eagerly "
                          f"instead ({self.failed})", RuntimeWarning, stacklevel=2)
            return None
        self._graphs[key] = graphed
        return graphed

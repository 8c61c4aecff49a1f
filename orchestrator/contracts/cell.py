"""Contract for ``orch.cells`` plugins: a recurrent cell stack with an explicit state.

A cell plugin is a subclass of :class:`Cell`. orch builds it from the study file's ``cell``
section plus the ``input_size`` its module chooses::

    cell = CellClass(input_size=..., hidden_size=..., num_layers=..., dropout=..., **extra)

Minimal example (a third-party package would register it under ``[project.entry-points."orch.cells"]``)::

    from orchestrator.contracts.settings import Count, Probability

    class GRU(Cell):
        def __init__(self, input_size: int, hidden_size: Count, num_layers: Count = 1,
                     dropout: Probability = 0.0):
            super().__init__(input_size, hidden_size, num_layers, dropout)
            # torch applies dropout between layers only: a single layer takes none
            self.rnn = torch.nn.GRU(input_size, hidden_size, num_layers,
                                    dropout=dropout if num_layers > 1 else 0.0, batch_first=True)

        def init_state(self, batch_size, device=None):
            return (torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device),)

        def forward(self, x, state):
            out, h = self.rnn(x, state[0])
            return out, (h,)

Check it in your tests with ``orchestrator.testing.check_cell(GRU)``; ``docs/plugins.md`` has the
lifecycle, the settings and the publishing steps.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import nn

#: The state of every layer of a cell as one structure: a tensor, or a tuple/list/dict of them.
State = Union[torch.Tensor, tuple, list, dict]


def map_state(fn, state: Any) -> Any:
    """Apply ``fn`` to every tensor in a (nested) state structure, keeping its shape."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, tuple):
        return tuple(map_state(fn, s) for s in state)
    if isinstance(state, list):
        return [map_state(fn, s) for s in state]
    if isinstance(state, dict):
        return {k: map_state(fn, v) for k, v in state.items()}
    if state is None:
        return None
    raise TypeError(f"cannot handle a state element of type {type(state).__name__}")


def detach_state(state: Any) -> Any:
    """Cut the autograd history of a state (the window boundary of truncated BPTT)."""
    return map_state(torch.Tensor.detach, state)


class Cell(nn.Module):
    """A stack of recurrent layers, batch-first, with its state passed in and out.

    Args:
        input_size: features per time step of the input.
        hidden_size: units per layer; the output has this many features.
        num_layers: stacked layers.
        dropout: dropout probability between layers (not after the last one).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        if input_size < 1 or hidden_size < 1 or num_layers < 1:
            raise ValueError(
                f"input_size, hidden_size and num_layers must be >= 1 "
                f"(got {input_size}, {hidden_size}, {num_layers})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (got {dropout})")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = dropout

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """Return the initial (zero) state for ``batch_size`` sequences on ``device``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Run ``x`` of shape ``[B, T, input_size]`` from ``state``.

        Returns the outputs of the last layer ``[B, T, hidden_size]`` and the state after the
        last step. Running a sequence in chunks, passing the state on, must equal one pass.
        """
        raise NotImplementedError

    def reset_parameters(self, init_scale: float | None = None) -> None:
        """Re-initialise all weights: uniform in ``±init_scale`` when given, else the cell's default
        (here: each child module's own ``reset_parameters``, as torch initialises ``nn.GRU``,
        ``nn.Linear``, ...; a cell with parameters of its own overrides this).

        Cells with parameters that carry meaning (for example a forget-gate bias) re-apply it
        here, so a module may re-initialise a cell without losing it.
        """
        if init_scale is not None:
            for p in self.parameters():
                nn.init.uniform_(p, -init_scale, init_scale)
            return
        for child in self.children():
            if hasattr(child, "reset_parameters"):
                child.reset_parameters()

"""Gru: a GRU cell for orch (``cell: {plugin: gru}`` in a run or study file)."""

from __future__ import annotations

import torch

from orchestrator.contracts.cell import Cell
from orchestrator.contracts.settings import Count, Probability


class Gru(Cell):
    """A stack of GRU layers (``torch.nn.GRU``). State: ``h`` of shape ``[num_layers, B, hidden_size]``."""

    def __init__(self, input_size: int, hidden_size: Count, num_layers: Count = 1, dropout: Probability = 0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout)
        # torch applies dropout between layers only: a single layer takes none (and warns if given one)
        self.rnn = torch.nn.GRU(input_size, hidden_size, num_layers, dropout=dropout if num_layers > 1 else 0.0,
                                batch_first=True)

    def init_state(self, batch_size: int, device=None) -> torch.Tensor:
        return torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device)

    def forward(self, x: torch.Tensor, state: torch.Tensor):
        return self.rnn(x, state)

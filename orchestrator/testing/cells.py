"""Contract checks for ``orch.cells`` plugins."""

from __future__ import annotations

import torch

from orchestrator.contracts.cell import Cell, detach_state, map_state


def _close(a, b, atol):
    flat_a, flat_b = [], []
    map_state(flat_a.append, a)
    map_state(flat_b.append, b)
    assert len(flat_a) == len(flat_b), "state structure changed"
    for x, y in zip(flat_a, flat_b):
        assert x.shape == y.shape, f"state shape {tuple(x.shape)} != {tuple(y.shape)}"
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def check_shapes(cell: Cell, batch: int = 3, steps: int = 7) -> None:
    """Outputs are ``[B, T, hidden_size]`` and the state keeps its structure and shapes."""
    x = torch.randn(batch, steps, cell.input_size)
    state = cell.init_state(batch, "cpu")
    out, new_state = cell(x, state)
    assert out.shape == (batch, steps, cell.hidden_size), f"outputs have shape {tuple(out.shape)}"
    _close(map_state(torch.zeros_like, state), map_state(torch.zeros_like, new_state), atol=0)


def check_chunked_equals_full(cell: Cell, batch: int = 3, chunks=(4, 1, 6, 3), atol: float = 1e-6) -> None:
    """Running a sequence in chunks with the state carried equals one pass over it."""
    cell.eval()  # no dropout, so the two passes compute the same function
    steps = sum(chunks)
    x = torch.randn(batch, steps, cell.input_size, dtype=torch.float64)
    cell = cell.double()
    with torch.no_grad():
        full, full_state = cell(x, map_state(lambda t: t.double(), cell.init_state(batch, "cpu")))
        state = map_state(lambda t: t.double(), cell.init_state(batch, "cpu"))
        outs, start = [], 0
        for n in chunks:
            out, state = cell(x[:, start:start + n], state)
            state = detach_state(state)
            outs.append(out)
            start += n
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=atol, rtol=0)
    _close(state, full_state, atol)


def check_gradients_flow(cell: Cell, batch: int = 2, steps: int = 5) -> None:
    """Every parameter and the initial state receive a gradient; a detached state cuts the graph."""
    cell.train()
    x = torch.randn(batch, steps, cell.input_size)
    state = map_state(lambda t: t.clone().requires_grad_(True), cell.init_state(batch, "cpu"))
    out, new_state = cell(x, state)
    out.sum().backward()
    for name, p in cell.named_parameters():
        assert p.grad is not None, f"parameter {name} got no gradient"
    leaves = []
    map_state(leaves.append, detach_state(new_state))
    assert all(not t.requires_grad for t in leaves), "detach_state left a tensor attached"


def check_cell(cls: type[Cell], input_size: int = 5, hidden_size: int = 8, **settings) -> None:
    """Run every cell check on ``cls`` (single- and two-layer builds)."""
    assert issubclass(cls, Cell), f"{cls} is not a subclass of orchestrator.contracts.cell.Cell"
    for layers in (1, 2):
        torch.manual_seed(0)
        cell = cls(input_size=input_size, hidden_size=hidden_size, num_layers=layers, **settings)
        check_shapes(cell)
        check_gradients_flow(cell)
        check_chunked_equals_full(cell)

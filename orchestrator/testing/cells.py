"""Contract checks for ``orch.cells`` plugins: ``check_cell(MyCell)`` in an author's own tests.

Each rule raises a :class:`~orchestrator.testing.rules.ContractError` naming the rule, what was
seen and how to fix it:

- ``cell.contract``: a subclass of :class:`~orchestrator.contracts.cell.Cell`;
- ``cell.settings``: its settings pass orch's own validation (types and declared ranges);
- ``cell.build``: it builds with one and with two layers;
- ``cell.output_shape``: outputs are ``[B, T, hidden_size]`` in the input's dtype;
- ``cell.state_shape``: the new state has the structure and shapes of ``init_state``;
- ``cell.gradients``: every parameter gets a gradient;
- ``cell.state_gradient``: the gradient flows through the state carried between two chunks of a
  window (a cell that detaches its state inside ``forward`` breaks truncated BPTT);
- ``cell.carry``: a sequence run in chunks with the state carried equals one pass over it;
- ``cell.detach``: :func:`~orchestrator.contracts.cell.detach_state` cuts every tensor of the state;
- ``cell.deterministic``: the same seed builds the same cell, computing the same outputs.
"""

from __future__ import annotations

import torch

from orchestrator.contracts.cell import Cell, detach_state, map_state
from orchestrator.testing.rules import ContractError, require, rule
from orchestrator.testing.settings import check_settings

STATE_FIX = ("return the state in the structure init_state makes (a tensor, or a tuple/list/dict of them), "
             "each tensor shaped like init_state's")


def _leaves(state) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_state(out.append, state)
    return out


def _same_structure(a, b, what: str) -> None:
    la, lb = _leaves(a), _leaves(b)
    require(len(la) == len(lb), "cell.state_shape", f"{what}: {len(lb)} state tensors instead of {len(la)}", STATE_FIX)
    for i, (x, y) in enumerate(zip(la, lb)):
        require(x.shape == y.shape, "cell.state_shape",
                f"{what}: state tensor {i} has shape {tuple(y.shape)}, init_state gives {tuple(x.shape)}", STATE_FIX)


def check_shapes(cell: Cell, batch: int = 3, steps: int = 7) -> None:
    """``cell.output_shape`` and ``cell.state_shape``."""
    x = torch.randn(batch, steps, cell.input_size)
    with rule("cell.state_shape", STATE_FIX):
        state = cell.init_state(batch, "cpu")
        _leaves(state)
    with rule("cell.output_shape", "forward(x, state) must return (outputs, new_state)"):
        out, new_state = cell(x, state)
    require(tuple(out.shape) == (batch, steps, cell.hidden_size), "cell.output_shape",
            f"outputs have shape {tuple(out.shape)}, expected {(batch, steps, cell.hidden_size)} (batch-first "
            "[B, T, hidden_size])", "return every step's output of the last layer, batch first")
    require(out.dtype == x.dtype, "cell.output_shape", f"outputs are {out.dtype} for {x.dtype} inputs",
            "compute in the input's dtype")
    _same_structure(state, new_state, "after one window")


def check_gradients_flow(cell: Cell, batch: int = 2, steps: int = 5) -> None:
    """``cell.gradients``, ``cell.state_gradient`` and ``cell.detach``."""
    cell.train()
    x1 = torch.randn(batch, steps, cell.input_size, requires_grad=True)
    x2 = torch.randn(batch, steps, cell.input_size)
    out1, state = cell(x1, cell.init_state(batch, "cpu"))
    out2, _ = cell(x2, state)  # the state carried, not detached: one window in two chunks
    (out1.sum() + out2.sum()).backward()
    for name, p in cell.named_parameters():
        require(p.grad is not None, "cell.gradients", f"parameter {name} got no gradient",
                "use every parameter in forward (or register unused tensors as buffers)")
    x1.grad = None
    cell.zero_grad()
    out1, state = cell(x1, cell.init_state(batch, "cpu"))
    out2, _ = cell(x2, state)
    out2.sum().backward()
    require(x1.grad is not None and bool(x1.grad.abs().sum() > 0), "cell.state_gradient",
            "the second chunk's outputs do not depend on the first chunk's inputs through the carried state: "
            "the state is detached (or rebuilt) inside forward",
            "do not detach the state in forward; orch detaches it at each window boundary itself")
    with rule("cell.detach", STATE_FIX):
        detached = detach_state(state)
    require(all(not t.requires_grad for t in _leaves(detached)), "cell.detach",
            "detach_state left a tensor of the state attached", STATE_FIX)


def check_chunked_equals_full(cell: Cell, batch: int = 3, chunks=(4, 1, 6, 3), atol: float = 1e-6) -> None:
    """``cell.carry``: running a sequence in chunks with the state carried equals one pass over it."""
    cell.eval()  # no dropout, so the two passes compute the same function
    x = torch.randn(batch, sum(chunks), cell.input_size, dtype=torch.float64)
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
    fix = "carry everything a step needs in the state (all layers), and start from the state passed in"
    gap = (torch.cat(outs, 1) - full).abs().max().item()
    require(gap <= atol, "cell.carry", f"chunks with the state carried differ from one pass by {gap:.3g}", fix)
    for a, b in zip(_leaves(state), _leaves(full_state)):
        require((a - b).abs().max().item() <= atol, "cell.carry", "the final state differs between the two", fix)
    cell.float()


def check_deterministic(build) -> None:
    """``cell.deterministic``: two builds under one seed hold the same weights and compute the same."""
    torch.manual_seed(0)
    a = build()
    torch.manual_seed(0)
    b = build()
    fix = "draw initial weights from torch's generator (seeded by orch), not from another source"
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        require(torch.equal(p, q), "cell.deterministic", f"{name} differs between two builds under one seed", fix)
    a.eval()
    b.eval()
    x = torch.randn(2, 4, a.input_size)
    with torch.no_grad():
        ya, _ = a(x, a.init_state(2, "cpu"))
        yb, _ = b(x, b.init_state(2, "cpu"))
    require(torch.equal(ya, yb), "cell.deterministic", "two equal cells give different outputs in eval mode",
            "make forward deterministic outside training (no sampling in eval mode)")


def check_cell(cls: type[Cell], input_size: int = 5, hidden_size: int = 8, **settings) -> None:
    """Run every cell rule on ``cls``, built with one and two layers (``settings``: its extra settings)."""
    require(isinstance(cls, type) and issubclass(cls, Cell), "cell.contract",
            f"{cls!r} is not a subclass of orchestrator.contracts.cell.Cell", "subclass Cell")
    check_settings(cls, "cell", {"hidden_size": hidden_size, **settings})
    for layers in (1, 2):
        def build(layers=layers):
            return cls(input_size=input_size, hidden_size=hidden_size, num_layers=layers, **settings)

        with rule("cell.build", "accept input_size, hidden_size, num_layers, dropout and your own settings as "
                                "keyword arguments, and call Cell.__init__ with the first four"):
            torch.manual_seed(0)
            cell = build()
        check_shapes(cell)
        check_gradients_flow(cell)
        check_chunked_equals_full(cell)
        check_deterministic(build)


__all__ = ["ContractError", "check_cell", "check_shapes", "check_gradients_flow", "check_chunked_equals_full",
           "check_deterministic"]

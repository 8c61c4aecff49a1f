"""Cells: the contract checks for every installed cell, and the DIY LSTM against torch.nn.LSTM."""

from __future__ import annotations

import pytest
import torch

from orch_plugins.cells import DIYLSTMCell, LSTMCell
from orchestrator import registry
from orchestrator.testing.cells import check_cell

CELLS = ["rnn", "lstm", "diy_lstm"]


@pytest.mark.parametrize("name", CELLS)
def test_cell_contract(name):
    # includes: chunked pass with the state carried equals one full pass
    check_cell(registry.get("cells", name), dropout=0.3)


def _pair(layers=3, forget_bias=0.7, dtype=torch.float64):
    torch.manual_seed(1)
    ref = LSTMCell(6, 10, layers, forget_bias=forget_bias).to(dtype)
    diy = DIYLSTMCell(6, 10, layers, forget_bias=forget_bias).to(dtype)
    diy.load_state_dict({k.removeprefix("rnn."): v for k, v in ref.state_dict().items()})
    return ref, diy


def _run(cell, x, state):
    out, (h, c) = cell(x, state)
    # a loss that reaches the outputs and both parts of the final state
    loss = (out ** 2).sum() + (h * 1.7).sum() + (c ** 3).sum()
    params = list(cell.parameters())
    grads = torch.autograd.grad(loss, [x, *state, *params])
    return out, h, c, grads


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_diy_lstm_equals_torch_lstm_outputs_state_and_gradients(dtype, atol):
    ref, diy = _pair(dtype=dtype)
    x = torch.randn(4, 13, 6, dtype=dtype, requires_grad=True)
    state = tuple(torch.randn(3, 4, 10, dtype=dtype, requires_grad=True) for _ in range(2))
    r_out, r_h, r_c, r_grads = _run(ref, x, state)
    d_out, d_h, d_c, d_grads = _run(diy, x, state)
    torch.testing.assert_close(d_out, r_out, atol=atol, rtol=0)
    torch.testing.assert_close(d_h, r_h, atol=atol, rtol=0)
    torch.testing.assert_close(d_c, r_c, atol=atol, rtol=0)
    names = ["x", "h0", "c0"] + [n for n, _ in ref.named_parameters()]
    for name, rg, dg in zip(names, r_grads, d_grads):
        torch.testing.assert_close(dg, rg, atol=atol * 10, rtol=1e-5, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_diy_lstm_backward_passes_gradcheck():
    torch.manual_seed(0)
    cell = DIYLSTMCell(3, 4, 2, forget_bias=1.0).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0):
        out, (h, c) = cell(x, (h0, c0))
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0))


@pytest.mark.parametrize("cls", [LSTMCell, DIYLSTMCell])
def test_forget_bias_reaches_forget_gate(cls):
    hidden = 10
    torch.manual_seed(3)
    base = cls(4, hidden, 2, forget_bias=0.0)
    torch.manual_seed(3)
    shifted = cls(4, hidden, 2, forget_bias=2.5)
    for (name, p0), (_, p1) in zip(base.named_parameters(), shifted.named_parameters()):
        if "bias_ih" in name:  # exactly the forget slice moves, by forget_bias
            diff = (p1 - p0).detach()
            torch.testing.assert_close(diff[hidden:2 * hidden], torch.full((hidden,), 2.5))
            assert diff[:hidden].abs().max() == 0 and diff[2 * hidden:].abs().max() == 0
        else:
            assert torch.equal(p0, p1), name
    # and re-initialisation (as a module with init_scale does) keeps it
    shifted.reset_parameters(init_scale=0.1)
    ih = [p for n, p in shifted.named_parameters() if "bias_ih" in n][0].detach()
    assert ih[hidden:2 * hidden].min() >= 2.4 and ih[:hidden].abs().max() <= 0.1


def test_forget_bias_changes_the_cell_state_update():
    # with the forget gate pushed open, a stored cell state survives a step far better
    torch.manual_seed(0)
    results = {}
    for fb in (-5.0, 5.0):
        torch.manual_seed(0)
        cell = DIYLSTMCell(2, 6, 1, forget_bias=fb)
        h0 = torch.zeros(1, 1, 6)
        c0 = torch.ones(1, 1, 6)
        with torch.no_grad():
            _, (_, c) = cell(torch.zeros(1, 1, 2), (h0, c0))
        results[fb] = c.mean().item()
    assert results[5.0] > 0.9 and abs(results[-5.0]) < 0.3

"""First-party cells: ``rnn``, ``lstm`` and the hand-written ``diy_lstm``.

All three keep PyTorch's parameter names and layouts (``weight_ih_l{k}``, ``weight_hh_l{k}``,
``bias_ih_l{k}``, ``bias_hh_l{k}``, gates in the order i, f, g, o), so weights copy between
``lstm`` and ``diy_lstm`` with ``load_state_dict``.

``forget_bias`` is added to the forget-gate bias whenever the parameters are (re)initialised, so
it reaches the forget-gate pre-activation at the start of training and stays trainable. With a
constant offset instead, training under SGD would be identical (the gradient is the same); a
parameter offset keeps the two LSTMs exactly interchangeable.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from orchestrator.contracts.cell import Cell, State
from orchestrator.contracts.settings import Count, Probability


class RNNCell(Cell):
    """Vanilla tanh RNN (``torch.nn.RNN``). State: ``(h,)`` with ``h`` of shape ``[L, B, H]``."""

    def __init__(self, input_size: int, hidden_size: Count, num_layers: Count = 1, dropout: Probability = 0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout)
        self.rnn = nn.RNN(input_size, hidden_size, num_layers, nonlinearity="tanh",
                          dropout=dropout if num_layers > 1 else 0.0, batch_first=True)

    def init_state(self, batch_size: int, device=None) -> State:
        return (torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device),)

    def forward(self, x: torch.Tensor, state: State):
        out, h = self.rnn(x, state[0])
        return out, (h,)

    def reset_parameters(self, init_scale: float | None = None) -> None:
        if init_scale is None:
            self.rnn.reset_parameters()
        else:
            super().reset_parameters(init_scale)


class _LSTMBase(Cell):
    """Shared construction for the two LSTMs: state ``(h, c)``, each ``[L, B, H]``."""

    def __init__(self, input_size: int, hidden_size: Count, num_layers: Count = 1,
                 dropout: Probability = 0.0, forget_bias: float = 0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout)
        self.forget_bias = float(forget_bias)

    def init_state(self, batch_size: int, device=None) -> State:
        shape = (self.num_layers, batch_size, self.hidden_size)
        return (torch.zeros(shape, device=device), torch.zeros(shape, device=device))

    def _bias_params(self):
        raise NotImplementedError

    def reset_parameters(self, init_scale: float | None = None) -> None:
        bound = init_scale if init_scale is not None else 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-bound, bound)
            h = self.hidden_size
            for bias_ih in self._bias_params():
                bias_ih[h:2 * h] += self.forget_bias


class LSTMCell(_LSTMBase):
    """``torch.nn.LSTM`` (cuDNN on GPU) with ``forget_bias`` added to the forget-gate bias."""

    def __init__(self, input_size: int, hidden_size: Count, num_layers: Count = 1,
                 dropout: Probability = 0.0, forget_bias: float = 0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout, forget_bias)
        self.rnn = nn.LSTM(input_size, hidden_size, num_layers,
                           dropout=dropout if num_layers > 1 else 0.0, batch_first=True)
        self.reset_parameters()

    def _bias_params(self):
        return [getattr(self.rnn, f"bias_ih_l{k}") for k in range(self.num_layers)]

    def forward(self, x: torch.Tensor, state: State):
        out, (h, c) = self.rnn(x, tuple(state))
        return out, (h, c)


class _LSTMLayer(torch.autograd.Function):
    """One LSTM layer over a whole window, forward and backward written out by hand.

    Forward: the input projection of all steps is one matmul; each step is one fused
    ``addmm`` for the recurrent part plus the gate arithmetic, with no autograd graph.
    Backward: walks the steps in reverse with the closed-form gate derivatives; the weight
    gradients are then one matmul each over all steps.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        B, T, _ = x.shape
        H = h0.shape[1]
        # [T, B, 4H]: input projection of every step at once, plus both biases
        gates_x = torch.addmm(b_ih + b_hh, x.transpose(0, 1).reshape(T * B, -1), w_ih.t()).view(T, B, 4 * H)
        acts = torch.empty_like(gates_x)           # activated gates i, f, g, o per step
        cs = x.new_empty(T + 1, B, H)               # c_{-1} .. c_{T-1}
        hs = x.new_empty(T + 1, B, H)               # h_{-1} .. h_{T-1}
        hs[0] = h0
        cs[0] = c0
        w_hh_t = w_hh.t()
        for t in range(T):
            g = torch.addmm(gates_x[t], hs[t], w_hh_t)
            a = acts[t]
            torch.sigmoid(g, out=a)                       # i, f, o (g's slot is overwritten next)
            torch.tanh(g[:, 2 * H:3 * H], out=a[:, 2 * H:3 * H])
            c = cs[t + 1]
            torch.mul(a[:, H:2 * H], cs[t], out=c)
            c.addcmul_(a[:, :H], a[:, 2 * H:3 * H])
            torch.mul(a[:, 3 * H:], torch.tanh(c), out=hs[t + 1])
        ctx.save_for_backward(x, w_ih, w_hh, acts, cs, hs)
        out = hs[1:].transpose(0, 1)
        return out, hs[T].clone(), cs[T].clone()

    @staticmethod
    def backward(ctx, d_out, d_hT, d_cT):
        x, w_ih, w_hh, acts, cs, hs = ctx.saved_tensors
        T, B, H4 = acts.shape
        H = H4 // 4
        i, f, g, o = acts[..., :H], acts[..., H:2 * H], acts[..., 2 * H:3 * H], acts[..., 3 * H:]
        tanh_c = torch.tanh(cs[1:])
        # Everything that does not depend on the backward recursion, for all steps at once:
        # d pre-activation = dc * k[i, f, g] for the first three gates, dh * k_o for the output gate.
        k = torch.empty_like(acts)
        torch.mul(g, i * (1 - i), out=k[..., :H])
        torch.mul(cs[:-1], f * (1 - f), out=k[..., H:2 * H])
        torch.mul(i, 1 - g * g, out=k[..., 2 * H:3 * H])
        torch.mul(tanh_c, o * (1 - o), out=k[..., 3 * H:])
        k3 = k[..., :3 * H].view(T, B, 3, H)
        o_dtanh = o * (1 - tanh_c * tanh_c)         # d c_t / d h_t along the output path
        d_gates = torch.empty_like(acts)
        d_g3 = d_gates[..., :3 * H].view(T, B, 3, H)
        d_out = d_out.transpose(0, 1) if d_out is not None else x.new_zeros(T, B, H)
        dh_next = d_hT if d_hT is not None else x.new_zeros(B, H)
        dc = d_cT.clone() if d_cT is not None else x.new_zeros(B, H)
        dh = dh_next + d_out[T - 1]
        for t in range(T - 1, -1, -1):
            dc.addcmul_(dh, o_dtanh[t])
            torch.mul(dc.unsqueeze(1), k3[t], out=d_g3[t])
            torch.mul(dh, k[t, :, 3 * H:], out=d_gates[t, :, 3 * H:])
            if t > 0:
                dh = torch.addmm(d_out[t - 1], d_gates[t], w_hh)
            else:
                dh = d_gates[t] @ w_hh
            dc = dc * f[t]
        flat = d_gates.view(T * B, H4)
        x_tb = x.transpose(0, 1).reshape(T * B, -1)
        d_x = (flat @ w_ih).view(T, B, -1).transpose(0, 1)
        d_w_ih = flat.t() @ x_tb
        d_w_hh = flat.t() @ hs[:-1].reshape(T * B, H)
        d_b = flat.sum(0)
        return d_x, dh, dc, d_w_ih, d_w_hh, d_b, d_b


class DIYLSTMCell(_LSTMBase):
    """Hand-written LSTM: gates from ``[x_t, h_{t-1}]``, ``c_t = f*c_{t-1} + i*g``, ``h_t = o*tanh(c_t)``.

    Numerically equal to ``torch.nn.LSTM`` given the same weights (same names and layout), with
    its own forward and backward (:class:`_LSTMLayer`) instead of an autograd graph per step.
    """

    def __init__(self, input_size: int, hidden_size: Count, num_layers: Count = 1,
                 dropout: Probability = 0.0, forget_bias: float = 0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout, forget_bias)
        for k in range(num_layers):
            in_k = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size, in_k)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
        self.drop = nn.Dropout(dropout)
        self.reset_parameters()

    def _bias_params(self):
        return [getattr(self, f"bias_ih_l{k}") for k in range(self.num_layers)]

    def forward(self, x: torch.Tensor, state: State):
        with torch.autocast(x.device.type, enabled=False):
            # the hand-written backward works in one dtype: the weights'
            dtype = self.weight_hh_l0.dtype
            return self._forward(x.to(dtype), tuple(s.to(dtype) for s in state))

    def _forward(self, x: torch.Tensor, state: State):
        h0, c0 = state
        hs, cs = [], []
        out = x
        for k in range(self.num_layers):
            if k > 0:
                out = self.drop(out)
            out, h, c = _LSTMLayer.apply(
                out, h0[k], c0[k],
                getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}"),
                getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}"),
            )
            hs.append(h)
            cs.append(c)
        return out, (torch.stack(hs), torch.stack(cs))

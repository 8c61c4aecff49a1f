"""A plain PyTorch stateful-TBPTT loop: the baseline orch's Lightning path is checked and timed against.

It trains a :class:`~orchestrator.contracts.module.SequenceModule` used as a plain ``nn.Module``
(its ``forward`` and ``loss`` only), with the optimiser, clipping and state carry written out
by hand, as a researcher would without orch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from orchestrator.contracts.cell import detach_state


def plain_tbptt(module, batches: Iterable, *, max_steps: int | None = None,
                device: str | torch.device = "cpu") -> dict:
    """Train ``module`` on ``(x, y)`` windows of one stream.

    Returns the per-token ``losses``, ``steps``, ``elements`` (tokens), ``seconds`` in all, and
    ``step_starts``: the clock at the start of every step plus one final entry at the end.

    The learning rate, optimiser and clipping are the module's settings. The state is carried
    across windows and detached at each boundary; the backpropagated loss is
    ``module.training_loss`` of the mean loss, as in orch's own loop.
    """
    module.to(device).train()
    opt_cls = torch.optim.SGD if module.optimizer_name == "sgd" else torch.optim.Adam
    opt = opt_cls(module.parameters(), lr=module.lr, weight_decay=module.weight_decay)
    clip = module.clip
    state = None
    losses: list[torch.Tensor] = []
    elems = 0
    starts = []
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        starts.append(time.perf_counter())
        x, y = x.to(device), y.to(device)
        if state is None:
            state = module.cell.init_state(x.shape[0], device)
        pred, state = module(x, state)
        state = detach_state(state)
        loss = module.loss(pred, y)
        opt.zero_grad(set_to_none=True)
        module.training_loss(loss, x).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        opt.step()
        losses.append(loss.detach())
        elems += y.numel()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    starts.append(time.perf_counter())
    return {"losses": [float(v) for v in losses], "steps": len(losses), "elements": elems,
            "seconds": starts[-1] - t0, "step_starts": starts}

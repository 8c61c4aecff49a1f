"""Forward+backward time per step of every cell on the PTB shapes, as ratios against ``lstm``.

    python benchmarks/cells.py                  # CPU, hidden 200 and 650
    python benchmarks/cells.py --device cuda    # on a GPU
    python benchmarks/cells.py --device cuda --graphs   # each cell also replayed as a CUDA graph

One "step" is one TBPTT window: batch 20, 35 time steps, 2 layers, input = hidden size, the
forward pass, a backward pass from the outputs and the final state. The cells run interleaved,
in the same process, so the ratio is robust to the machine's speed and load. With ``--graphs``
every cell is timed a second time as ``NAME+graphs``: its forward and backward captured once
(``torch.cuda.make_graphed_callables``, as ``module.cuda_graphs`` does for a whole window) and
replayed, against the same eager ``lstm`` (cuDNN).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils import _pytree as pytree

from orchestrator import registry


class Flat(torch.nn.Module):
    """``(x, *state leaves) -> (out, *state leaves)``: a cell with only tensors in and out, as
    ``make_graphed_callables`` takes it."""

    def __init__(self, cell, state):
        super().__init__()
        self.cell = cell
        self.treedef = pytree.tree_structure(state)

    def forward(self, x, *flat):
        out, state = self.cell(x, pytree.tree_unflatten(list(flat), self.treedef))
        return (out, *pytree.tree_leaves(state))


class Graphed:
    """A cell whose forward and backward are captured once and replayed; called like the cell."""

    def __init__(self, cell, x, state):
        self.cell = cell
        self.flat = torch.cuda.make_graphed_callables(Flat(cell, state),
                                                      (x, *pytree.tree_leaves(state)))

    def init_state(self, batch_size, device=None):
        return self.cell.init_state(batch_size, device)

    def __call__(self, x, state):
        out = self.flat(x, *pytree.tree_leaves(state))
        return out[0], tuple(out[1:])


def time_cell(cell, x, state, repeats: int, sync) -> list[float]:
    def step():
        out, new_state = cell(x, state)
        loss = out.sum() + sum(s.sum() for s in new_state)
        loss.backward()

    step()  # warm-up (allocations, cuDNN plans)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, nargs="+", default=[200, 650])
    parser.add_argument("--cells", nargs="+", default=["lstm", "diy_lstm", "rnn"])
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per size")
    parser.add_argument("--repeats", type=int, default=4, help="steps per cell per round")
    parser.add_argument("--graphs", action="store_true", help="also time each cell replayed as a CUDA graph")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = []
    for hidden in args.hidden:
        torch.manual_seed(0)
        cells = {n: registry.get("cells", n)(input_size=hidden, hidden_size=hidden,
                                              num_layers=args.layers).to(device) for n in args.cells}
        x = torch.randn(args.batch, args.steps, hidden, device=device)
        if args.graphs:
            for n in args.cells:
                cells[f"{n}+graphs"] = Graphed(cells[n], x, cells[n].init_state(args.batch, device))
        samples = {n: [] for n in cells}
        for _ in range(args.rounds):
            for name, cell in cells.items():
                samples[name] += time_cell(cell, x, cell.init_state(args.batch, device), args.repeats, sync)
        med = {n: statistics.median(s) for n, s in samples.items()}
        for name in cells:
            row = {"device": str(device), "hidden": hidden, "cell": name, "ms_per_step": round(med[name] * 1e3, 3),
                   "ratio_vs_lstm": round(med[name] / med["lstm"], 3) if "lstm" in med else None}
            results.append(row)
            print(f"{device.type:4} hidden {hidden:5} {name:16} {row['ms_per_step']:9.2f} ms/step  "
                  f"x{row['ratio_vs_lstm']} of lstm", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

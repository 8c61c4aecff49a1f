"""Forward+backward time per step of every cell on the PTB shapes, as ratios against ``lstm``.

    python benchmarks/cells.py                  # CPU, hidden 200 and 650
    python benchmarks/cells.py --device cuda    # on a GPU

One "step" is one TBPTT window: batch 20, 35 time steps, 2 layers, input = hidden size, the
forward pass, a backward pass from the outputs and the final state. The cells run interleaved,
in the same process, so the ratio is robust to the machine's speed and load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from orchestrator import registry


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
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = []
    for hidden in args.hidden:
        torch.manual_seed(0)
        cells = {n: registry.get("cells", n)(input_size=hidden, hidden_size=hidden,
                                              num_layers=args.layers).to(device) for n in args.cells}
        x = torch.randn(args.batch, args.steps, hidden, device=device)
        samples = {n: [] for n in cells}
        for _ in range(args.rounds):
            for name, cell in cells.items():
                samples[name] += time_cell(cell, x, cell.init_state(args.batch, device), args.repeats, sync)
        med = {n: statistics.median(s) for n, s in samples.items()}
        for name in cells:
            row = {"device": str(device), "hidden": hidden, "cell": name, "ms_per_step": round(med[name] * 1e3, 3),
                   "ratio_vs_lstm": round(med[name] / med["lstm"], 3) if "lstm" in med else None}
            results.append(row)
            print(f"{device.type:4} hidden {hidden:5} {name:10} {row['ms_per_step']:9.2f} ms/step  "
                  f"x{row['ratio_vs_lstm']} of lstm", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

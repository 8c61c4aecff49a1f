"""Training throughput of the PTB language model: orch's Lightning path against a plain PyTorch loop.

    ORCH_DATA_DIR=../shared/data python benchmarks/throughput.py            # CPU, every cell
    ORCH_DATA_DIR=../shared/data python benchmarks/throughput.py --accelerator gpu --steps 400

For each cell, the same model (``studies/ptb_small.yaml``, Zaremba "small") is trained for
``--steps`` windows both ways, ``--rounds`` times each, by one command that runs every
measurement in a fresh process, alternating the order:

* orch: ``orchestrator.training.fit.tracked_fit`` with its Lightning module, stateful TBPTT and MLflow logging on
  (a throwaway SQLite store);
* plain: :func:`orchestrator.testing.reference.plain_tbptt`, a hand-written loop over the same
  windows with the same optimiser, clipping and state carry.

Both are timed the same way: the clock at the start of every training step (a Lightning
callback for orch, the loop itself for plain) and at the end of the last one, skipping the first
``--warmup`` steps; tokens per second over that span include everything that happens between
steps (data loading, Lightning's loop, state handling, logging). The ratio is the median over rounds
of orch / plain within a round. The wall-clock ratio including
Trainer and MLflow set-up is printed as well. On a GPU, orch replays each training window as a CUDA
graph by default (``module.cuda_graphs``); ``--set module.cuda_graphs=false`` measures it eager.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch

from orchestrator.spec.run import load_spec
from orchestrator.testing.reference import plain_tbptt
from orchestrator.tracking import client as tracking
from orchestrator.tracking.runs import end_run, start_run
from orchestrator.training.build import build
from orchestrator.training.fit import tracked_fit


class StepClock(pl.Callback):
    """The clock at the start of every training step, and at the end of the last one."""

    def __init__(self, sync):
        self.starts: list[float] = []
        self.sync = sync

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_epoch_end(self, trainer, module):
        self.sync()
        self.starts.append(time.perf_counter())


def rate(starts: list[float], tokens_per_step: int, warmup: int) -> float:
    """Tokens per second from step ``warmup`` to the end."""
    steps = len(starts) - 1 - warmup
    return steps * tokens_per_step / (starts[-1] - starts[warmup])


def measure(kind: str, spec, steps: int, warmup: int, device: str, store: str) -> dict:
    """One measurement in this (fresh) process: ``orch`` or ``plain``."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tokens = spec.dataset.settings["batch_size"] * spec.dataset.settings["bptt"]
    t = time.perf_counter()
    if kind == "orch":
        mlf = tracking.client(f"sqlite:///{store}/mlflow.db")
        clock = StepClock(sync)
        run_id = start_run(mlf, "throughput")
        tracked_fit(spec, mlf, run_id, callbacks=[clock], enable_progress_bar=False)
        end_run(mlf, run_id, "complete")
        starts = clock.starts
    else:
        built = build(spec)
        built.datamodule.setup("fit")
        starts = plain_tbptt(built.module, built.datamodule.train_dataloader(), max_steps=steps,
                             device=device)["step_starts"]
    return {"tokens_per_s": rate(starts, tokens, warmup), "wall_s": time.perf_counter() - t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="studies/ptb_small.yaml")
    parser.add_argument("--cells", nargs="+", default=["lstm", "diy_lstm", "rnn"])
    parser.add_argument("--steps", type=int, default=150, help="training windows per measurement")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--one", choices=["orch", "plain"], help=argparse.SUPPRESS)  # a single measurement
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    if args.one:
        spec, _ = load_spec(args.study, [*args.overrides, f"cell.plugin={args.cells[0]}",
                                         f"trainer.accelerator={args.accelerator}", "trainer.max_epochs=1",
                                         f"trainer.limit_train_batches={args.steps}", "trainer.limit_val_batches=0"])
        print(json.dumps(measure(args.one, spec, args.steps, args.warmup, device, args.store)))
        return
    results = []
    with tempfile.TemporaryDirectory() as store:
        for cell in args.cells:
            samples = {"orch": [], "plain": []}
            for r in range(args.rounds):
                # each measurement in a fresh process, the order alternating (ABBA) so that neither
                # side inherits the other's state or a drift in machine speed
                for kind in (("orch", "plain") if r % 2 == 0 else ("plain", "orch")):
                    cmd = [sys.executable, __file__, "--one", kind, "--store", store, "--cells", cell,
                           "--study", args.study, "--steps", str(args.steps), "--warmup", str(args.warmup),
                           "--accelerator", args.accelerator] + [a for o in args.overrides for a in ("--set", o)]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    samples[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
            ratios = [o["tokens_per_s"] / p["tokens_per_s"] for o, p in zip(samples["orch"], samples["plain"])]
            med = {k: statistics.median(v["tokens_per_s"] for v in samples[k]) for k in samples}
            wall = {k: statistics.median(v["wall_s"] for v in samples[k]) for k in samples}
            row = {"cell": cell, "device": device, "steps": args.steps,
                   "orch_tokens_per_s": round(med["orch"]), "plain_tokens_per_s": round(med["plain"]),
                   "ratio": round(statistics.median(ratios), 3),
                   "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
                   "wall_ratio_incl_setup": round(wall["plain"] / wall["orch"], 3)}
            results.append(row)
            print(f"{cell:9} orch {row['orch_tokens_per_s']:8} tok/s  plain {row['plain_tokens_per_s']:8} tok/s  "
                  f"ratio {row['ratio']:.3f} (rounds: {row['ratio_min_max'][0]}..{row['ratio_min_max'][1]}; "
                  f"wall incl. set-up {row['wall_ratio_incl_setup']:.3f})", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

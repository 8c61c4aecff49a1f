"""Training throughput of the PTB language model: orch's Lightning path against a plain PyTorch loop.

    ORCH_DATA_DIR=../shared/data python benchmarks/throughput.py            # CPU, every cell
    ORCH_DATA_DIR=../shared/data python benchmarks/throughput.py --accelerator gpu --steps 400

For each cell, the same model (``studies/ptb_small.yaml``, Zaremba "small") is trained for
``--steps`` windows twice, in the same command and interleaved ``--rounds`` times:

* orch: ``runner.tracked_fit`` with its Lightning module, stateful TBPTT and MLflow logging on
  (a throwaway SQLite store);
* plain: :func:`orchestrator.testing.reference.plain_tbptt`, a hand-written loop over the same
  windows with the same optimiser, clipping and state carry.

Both are timed the same way: the clock at the start of every training step (a Lightning
callback for orch, the loop itself for plain) and at the end of the last one, skipping the first
``--warmup`` steps; tokens per second over that span include everything that happens between
steps (data loading, Lightning's loop, state handling, logging). The ratio is orch / plain. The
wall-clock ratio including Trainer and MLflow set-up is printed as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch

from orchestrator import runner, tracking
from orchestrator.config import load_spec
from orchestrator.testing.reference import plain_tbptt


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="studies/ptb_small.yaml")
    parser.add_argument("--cells", nargs="+", default=["lstm", "diy_lstm", "rnn"])
    parser.add_argument("--steps", type=int, default=150, help="training windows per measurement")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = []
    with tempfile.TemporaryDirectory() as store:
        mlf = tracking.client(f"sqlite:///{store}/mlflow.db")
        for cell in args.cells:
            spec, _ = load_spec(args.study, [*args.overrides, f"cell.plugin={cell}",
                                             f"trainer.accelerator={args.accelerator}", "trainer.max_epochs=1",
                                             f"trainer.limit_train_batches={args.steps}",
                                             "trainer.limit_val_batches=0"])
            orch_tps, plain_tps, orch_wall, plain_wall = [], [], [], []
            tokens = spec.dataset.settings["batch_size"] * spec.dataset.settings["bptt"]
            for _ in range(args.rounds):
                clock = StepClock(sync)
                t = time.perf_counter()
                run_id = runner.start_run(mlf, "throughput", run_name=cell)
                runner.tracked_fit(spec, mlf, run_id, callbacks=[clock], enable_progress_bar=False)
                runner.end_run(mlf, run_id, "complete")
                orch_wall.append(time.perf_counter() - t)
                orch_tps.append(rate(clock.starts, tokens, args.warmup))

                t = time.perf_counter()
                built = runner.build(spec)
                built.datamodule.setup("fit")
                out = plain_tbptt(built.module, built.datamodule.train_dataloader(), max_steps=args.steps,
                                  device=device)
                plain_wall.append(time.perf_counter() - t)
                plain_tps.append(rate(out["step_starts"], tokens, args.warmup))
            row = {"cell": cell, "device": device, "steps": args.steps,
                   "orch_tokens_per_s": round(statistics.median(orch_tps)),
                   "plain_tokens_per_s": round(statistics.median(plain_tps)),
                   "ratio": round(statistics.median(orch_tps) / statistics.median(plain_tps), 3),
                   "wall_ratio_incl_setup": round(statistics.median(plain_wall) / statistics.median(orch_wall), 3)}
            results.append(row)
            print(f"{cell:9} orch {row['orch_tokens_per_s']:8} tok/s  plain {row['plain_tokens_per_s']:8} tok/s  "
                  f"ratio {row['ratio']:.3f}  (wall incl. set-up {row['wall_ratio_incl_setup']:.3f})", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()

"""Training throughput of the PTB language model: orch's Lightning path against a plain PyTorch loop.

    ORCH_DATA_DIR=../shared/data python benchmarks/throughput.py            # CPU, every cell
    ORCH_DATA_DIR=../shared/data python benchmarks/throughput.py --accelerator gpu --steps 400

For each cell, the same model (``studies/ptb_small.yaml``, Zaremba "small") is trained for
``--steps`` windows twice, in the same command and interleaved ``--rounds`` times:

* orch: ``runner.tracked_run`` with its Lightning module, stateful TBPTT and MLflow logging on
  (a throwaway SQLite store);
* plain: :func:`orchestrator.testing.reference.plain_tbptt`, a hand-written loop over the same
  windows with the same optimiser, clipping and state carry.

Tokens per second are counted inside the training epoch for both (orch's ``tokens_per_s``
metric; the plain loop's own clock), so the ratio is the per-step overhead of orch + Lightning.
The wall-clock ratio including Trainer and MLflow set-up is printed as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings

import torch

from orchestrator import runner
from orchestrator.config import load_spec
from orchestrator.testing.reference import plain_tbptt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="studies/ptb_small.yaml")
    parser.add_argument("--cells", nargs="+", default=["lstm", "diy_lstm", "rnn"])
    parser.add_argument("--steps", type=int, default=150, help="training windows per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    results = []
    with tempfile.TemporaryDirectory() as store:
        uri = f"sqlite:///{store}/mlflow.db"
        for cell in args.cells:
            spec, _ = load_spec(args.study, [*args.overrides, f"cell.plugin={cell}",
                                             f"trainer.accelerator={args.accelerator}", "trainer.max_epochs=1",
                                             f"trainer.limit_train_batches={args.steps}",
                                             "trainer.limit_val_batches=0"])
            orch_tps, plain_tps, orch_wall, plain_wall = [], [], [], []
            for _ in range(args.rounds):
                t = time.perf_counter()
                res = runner.tracked_run(spec, tracking_uri=uri, experiment="throughput", run_name=cell,
                                         enable_progress_bar=False)
                orch_wall.append(time.perf_counter() - t)
                orch_tps.append(res.metrics["tokens_per_s"])

                t = time.perf_counter()
                built = runner.build(spec)
                built.datamodule.setup("fit")
                out = plain_tbptt(built.module, built.datamodule.train_dataloader(), max_steps=args.steps,
                                  device=device)
                plain_wall.append(time.perf_counter() - t)
                plain_tps.append(out["elements"] / out["seconds"])
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

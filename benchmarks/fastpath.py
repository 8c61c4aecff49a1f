"""One PTB epoch of the main job's model, eager against the fast paths, next to a plain PyTorch loop.

    ORCH_DATA_DIR=../shared/data python benchmarks/fastpath.py --accelerator gpu          # a full epoch each
    ORCH_DATA_DIR=../shared/data python benchmarks/fastpath.py --steps 30 --val-steps 5   # a CPU smoke run

The model is ``studies/ptb.yaml``'s fixed settings (Zaremba "medium": 2x650 LSTM, dropout 0.5,
batch 20, bptt 35). Each variant trains one epoch (or ``--steps`` windows) in a fresh process
and then runs the validation pass:

* ``plain``: :func:`orchestrator.testing.reference.plain_tbptt`, the hand-written loop (no validation);
* ``eager``: orch with ``module.cuda_graphs=false``;
* ``graphs``: ``module.cuda_graphs=true`` (:mod:`orchestrator.training.graphs`), orch's default;
* ``bf16``: eager with ``trainer.precision=bf16-mixed``;
* ``graphs+bf16``: both.

Printed per variant: the epoch's training seconds (first step to the end of the last, capture
and warm-up included), tokens per second after ``--warmup`` steps, the ratio of that to
``plain``, and ``val_ppl`` with its difference from ``eager`` (dropout draws differ between
variants, so a difference of a few tenths of a percent is noise, not the fast path).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from throughput import StepClock, rate

VARIANTS = {
    "plain": [],
    "eager": ["module.cuda_graphs=false"],
    "graphs": ["module.cuda_graphs=true"],
    "bf16": ["module.cuda_graphs=false", "trainer.precision=bf16-mixed"],
    "graphs+bf16": ["module.cuda_graphs=true", "trainer.precision=bf16-mixed"],
}


def measure(variant: str, spec, steps: int | None, warmup: int, device: str, store: str) -> dict:
    """One variant in this (fresh) process."""
    from orchestrator.testing.reference import plain_tbptt
    from orchestrator.tracking import client as tracking
    from orchestrator.tracking.runs import end_run, start_run
    from orchestrator.training.build import build
    from orchestrator.training.fit import tracked_fit


    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tokens = spec.dataset.settings["batch_size"] * spec.dataset.settings["bptt"]
    if variant == "plain":
        built = build(spec)
        built.datamodule.setup("fit")
        starts = plain_tbptt(built.module, built.datamodule.train_dataloader(), max_steps=steps,
                             device=device)["step_starts"]
        val_ppl = None
    else:
        mlf = tracking.client(f"sqlite:///{store}/mlflow-{variant}.db")
        clock = StepClock(sync)
        run_id = start_run(mlf, "fastpath")
        result = tracked_fit(spec, mlf, run_id, callbacks=[clock], enable_progress_bar=False)
        end_run(mlf, run_id, "complete")
        starts, val_ppl = clock.starts, result.metrics.get("val_ppl")
    return {"variant": variant, "steps": len(starts) - 1, "train_s": starts[-1] - starts[0],
            "tokens_per_s": rate(starts, tokens, warmup), "val_ppl": val_ppl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="studies/ptb.yaml")
    parser.add_argument("--cell", default="lstm")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--steps", type=int, help="training windows (default: the whole epoch)")
    parser.add_argument("--val-steps", type=int, help="validation windows (default: all)")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of tokens per second")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    if args.one:
        from orchestrator.spec.run import load_spec

        warnings.filterwarnings("ignore")
        logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
        limits = [f"trainer.limit_train_batches={args.steps}"] if args.steps else []
        limits += [f"trainer.limit_val_batches={args.val_steps}"] if args.val_steps else []
        spec, _ = load_spec(args.study, [*args.overrides, *VARIANTS[args.one], f"cell.plugin={args.cell}",
                                         f"trainer.accelerator={args.accelerator}", "trainer.max_epochs=1",
                                         *limits])
        print(json.dumps(measure(args.one, spec, args.steps, args.warmup, device, args.store)))
        return
    rows = {}
    with tempfile.TemporaryDirectory() as store:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--one", variant, "--store", store, "--cell", args.cell,
                   "--study", args.study, "--accelerator", args.accelerator, "--warmup", str(args.warmup)]
            cmd += ["--steps", str(args.steps)] if args.steps else []
            cmd += ["--val-steps", str(args.val_steps)] if args.val_steps else []
            cmd += [a for o in args.overrides for a in ("--set", o)]
            t = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{variant:12} failed (exit {out.returncode}):\n{out.stderr[-3000:]}", flush=True)
                continue
            row = rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            row["process_s"] = round(time.perf_counter() - t, 1)
            plain = rows.get("plain", {}).get("tokens_per_s")
            eager = rows.get("eager", {}).get("val_ppl")
            vs_plain = f"x{row['tokens_per_s'] / plain:.3f} of plain" if plain else ""
            ppl = f"val_ppl {row['val_ppl']:.2f}" if row["val_ppl"] else ""
            if row["val_ppl"] and eager and variant != "eager":
                ppl += f" ({(row['val_ppl'] / eager - 1) * 100:+.2f}% vs eager)"
            print(f"{args.cell} {variant:12} {row['steps']:5} steps in {row['train_s']:7.2f} s  "
                  f"{row['tokens_per_s']:9.0f} tok/s {vs_plain:16} {ppl}", flush=True)
    print(json.dumps({"device": device, "cell": args.cell, "rows": list(rows.values())}))


if __name__ == "__main__":
    main()

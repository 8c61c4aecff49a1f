"""Where orch's training step spends its time beyond the model: a profile against the plain loop.

    ORCH_DATA_DIR=../shared/data python benchmarks/overhead.py                    # CPU
    ORCH_DATA_DIR=../shared/data python benchmarks/overhead.py --accelerator gpu  # one GPU

One process trains ``studies/ptb_small.yaml`` (hidden ``--hidden``) for ``--steps`` windows three
ways, in this order: the plain loop (:func:`orchestrator.testing.reference.plain_tbptt`), orch's
path (``orchestrator.training.fit.tracked_fit``, MLflow on, a throwaway SQLite store) under Lightning's
``SimpleProfiler``, and orch's path again under ``torch.profiler`` for ``--profile-steps``
windows after ``--warmup``. It prints:

* ms per step of each side and their ratio (the time between step starts, warm-up left out);
* Lightning's hook breakdown: mean ms per step in the training batch, the optimiser step with
  its closure (forward, backward, clipping), the data fetch, callbacks and module hooks;
* host syncs per step (``aten::_local_scalar_dense``: ``.item()``/``float()`` of a device
  tensor; ``cudaStreamSynchronize``, ``cudaMemcpyAsync`` on a GPU), and the ops with the most
  self CPU time.

A ratio under 1 of orch/plain throughput is overhead that these lines place.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings

import pytorch_lightning as pl
import torch
from throughput import StepClock  # benchmarks/ is the script's folder, first on sys.path

from orchestrator.spec.run import load_spec
from orchestrator.testing.reference import plain_tbptt
from orchestrator.tracking import client as tracking
from orchestrator.tracking.runs import start_run
from orchestrator.training.build import build
from orchestrator.training.fit import tracked_fit


class Profiled(pl.Callback):
    """torch.profiler around steps ``[start, start + count)``."""

    def __init__(self, start: int, count: int, device: str):
        self.start, self.count = start, count
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.start:
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.start + self.count - 1:
            self.prof.__exit__(None, None, None)


def ms_per_step(starts: list[float], warmup: int) -> float:
    return (starts[-1] - starts[warmup]) / (len(starts) - 1 - warmup) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="studies/ptb_small.yaml")
    parser.add_argument("--cell", default="lstm")
    parser.add_argument("--hidden", type=int, default=650)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--profile-steps", type=int, default=40)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    spec, _ = load_spec(args.study, [f"cell.plugin={args.cell}", f"cell.hidden_size={args.hidden}",
                                     f"trainer.accelerator={args.accelerator}", "trainer.max_epochs=1",
                                     f"trainer.limit_train_batches={args.steps}", "trainer.limit_val_batches=0"])
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "cell": args.cell,
                 "hidden": args.hidden, "steps": args.steps}

    built = build(spec)
    built.datamodule.setup("fit")
    starts = plain_tbptt(built.module, built.datamodule.train_dataloader(), max_steps=args.steps,
                         device=device)["step_starts"]
    sync()
    out["plain_ms_per_step"] = round(ms_per_step(starts, args.warmup), 3)

    from pytorch_lightning.profilers import SimpleProfiler

    with tempfile.TemporaryDirectory() as store:
        mlf = tracking.client(f"sqlite:///{store}/mlflow.db")
        clock = StepClock(sync)
        profiler = SimpleProfiler()
        run_id = start_run(mlf, "overhead")
        tracked_fit(spec, mlf, run_id, callbacks=[clock], enable_progress_bar=False, profiler=profiler)
        out["orch_ms_per_step"] = round(ms_per_step(clock.starts, args.warmup), 3)
        out["orch_over_plain_throughput"] = round(out["plain_ms_per_step"] / out["orch_ms_per_step"], 3)
        hooks = {}
        for action, durations in profiler.recorded_durations.items():
            total = sum(durations)
            if len(durations) >= args.steps // 2:  # per-step actions only
                hooks[action] = round(total / args.steps * 1e3, 3)
        out["lightning_ms_per_step"] = dict(sorted(hooks.items(), key=lambda kv: -kv[1])[:20])

        prof = Profiled(args.warmup, args.profile_steps, device)
        run_id = start_run(mlf, "overhead-profile")
        tracked_fit(spec, mlf, run_id, callbacks=[prof], enable_progress_bar=False)
        events = prof.prof.key_averages()
        per_step = {}
        for name in ("aten::_local_scalar_dense", "aten::item", "cudaStreamSynchronize", "cudaMemcpyAsync",
                     "cudaDeviceSynchronize", "aten::copy_", "aten::detach", "aten::clone"):
            hit = [e for e in events if e.key == name]
            if hit:
                per_step[name] = {"calls": round(hit[0].count / args.profile_steps, 2),
                                  "self_cpu_ms": round(hit[0].self_cpu_time_total / 1e3 / args.profile_steps, 3)}
        out["per_step_calls"] = per_step
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
        out["top_self_cpu_ms_per_step"] = {e.key: round(e.self_cpu_time_total / 1e3 / args.profile_steps, 3)
                                           for e in top}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""What preemption costs: training throughput with window checkpoints on vs off, what a checkpoint
stalls training for (a folder, and the MLflow store whose upload runs beside training), and the
windows a preempted trial trains again, with epoch-end checkpoints vs window checkpoints.

    ORCH_DATA_DIR=../shared/data python benchmarks/preemption.py [--windows 400] [--every 100]

One process trains ``studies/ptb_small.yaml`` on the CPU for ``--windows`` windows (one epoch,
``limit_train_batches``), in turn without window checkpoints and with one every ``--every`` windows
(to a folder), ``--repeats`` times each, alternating; then once with the MLflow store (a throwaway
SQLite store, artifacts in a folder). It prints ms per window of each, their ratio, the mean
write and upload time of one checkpoint, and from them the slowdown at the default interval
(one checkpoint every ``study.checkpoint_every.seconds``, 300 s). With ``--s3`` it also trains once
with an S3 store: moto's S3 server on a loopback port, started here, reached over HTTP by s3fs (the
dev extra). Then a trial is stopped by a
real SIGTERM at window ``--stop`` of an epoch and resumed, once keeping only epoch-end checkpoints
(as orch did before) and once with window checkpoints: the windows trained twice are counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

from orchestrator.execution import stopping
from orchestrator.spec.run import load_spec
from orchestrator.spec.study import CheckpointEvery
from orchestrator.tracking import client as tracking
from orchestrator.tracking.runs import start_run
from orchestrator.training.callbacks import interruption
from orchestrator.training.checkpoints import LastCheckpoint
from orchestrator.training.fit import fit
from orchestrator.training.stores import FsspecLine, MlflowLine


class Clock(pl.Callback):
    def __init__(self):
        self.starts: list[float] = []
        self.windows = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.windows += 1

    def on_train_epoch_end(self, trainer, module):
        self.starts.append(time.perf_counter())


class Timed(LastCheckpoint):
    """Window checkpoints, each one's write timed."""

    writes: list[float]

    def _save(self, trainer, finished, window):
        t = time.perf_counter()
        super()._save(trainer, finished, window)
        self.writes = getattr(self, "writes", []) + [time.perf_counter() - t]


class EpochOnly(LastCheckpoint):
    """orch before window checkpoints: the end of each epoch only."""

    def on_train_batch_end(self, *args):
        pass

    def save_window(self, *args):
        pass


class SigtermAt(pl.Callback):
    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def on_before_backward(self, trainer, module, loss):
        self.seen += 1
        if self.seen == self.n:
            os.kill(os.getpid(), signal.SIGTERM)


def ms_per_window(clock: Clock, warmup: int = 10) -> float:
    return (clock.starts[-1] - clock.starts[warmup]) / (len(clock.starts) - 1 - warmup) * 1000


def redone(spec, callback, stop: int) -> int:
    """Windows trained again after a SIGTERM at window ``stop`` of epoch 1 (of 2) and a resume."""
    with tempfile.TemporaryDirectory() as tmp:
        first, second = Clock(), Clock()
        try:
            fit(spec, callbacks=[callback(Path(tmp), "k"), first, SigtermAt(stop), interruption()],
                enable_progress_bar=False)
        except stopping.TrialInterrupted:
            pass
        stopping._stop = None
        resume = Path(tmp) / "last.ckpt"
        fit(spec, callbacks=[callback(Path(tmp), "k"), second], resume=resume if resume.exists() else None,
            enable_progress_bar=False)
        return first.windows + second.windows - 2 * spec.trainer["limit_train_batches"]


def uploaded(spec, line, every: int) -> tuple[float, Timed]:
    """ms per window with a window checkpoint every ``every`` windows to the uploaded ``line``."""
    clock = Clock()
    ckpt = Timed(line, "k", every_windows=every)
    fit(spec, callbacks=[ckpt, clock], enable_progress_bar=False)
    line.wait()
    return ms_per_window(clock), ckpt


def s3_store():
    """moto's S3 server on a free loopback port, a bucket in it: (process, URL)."""
    import socket
    import subprocess
    import sys
    import urllib.request

    import s3fs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2).read()
            break
        except OSError:
            time.sleep(0.2)
    s3fs.S3FileSystem().mkdir("bench")
    return proc, "s3://bench/checkpoints"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=400)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stop", type=int, default=150, help="the window of the second epoch a SIGTERM stops")
    parser.add_argument("--s3", action="store_true", help="also an S3 store (moto's server, started here)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    spec, _ = load_spec("studies/ptb_small.yaml", [f"trainer.limit_train_batches={args.windows}",
                                                   "trainer.limit_val_batches=5", "trainer.max_epochs=1",
                                                   "trainer.accelerator=cpu"])
    runs: dict[str, list[float]] = {"off": [], "on": []}
    writes: list[float] = []
    for _ in range(args.repeats):
        for kind in ("off", "on"):
            torch.manual_seed(0)
            clock = Clock()
            with tempfile.TemporaryDirectory() as tmp:
                extra = [Timed(Path(tmp), "k", every_windows=args.every)] if kind == "on" else []
                fit(spec, callbacks=[*extra, clock], enable_progress_bar=False)
                writes += extra[0].writes if extra else []
            runs[kind].append(ms_per_window(clock))
    with tempfile.TemporaryDirectory() as tmp:  # the MLflow store: uploads from a thread beside training
        mlf = tracking.client(f"sqlite:///{tmp}/mlflow.db")
        run_id = start_run(mlf, "preemption")
        line = MlflowLine(mlf, run_id, 0)
        mlflow_ms, ckpt = uploaded(spec, line, args.every)
    s3 = {}
    if args.s3:
        proc, url = s3_store()
        try:
            s3_line = FsspecLine(url, "bench", 0)
            s3_ms, s3_ckpt = uploaded(spec, s3_line, args.every)
        finally:
            proc.terminate()
        s3 = {"ms_per_window": round(s3_ms, 2),
              "write_ms (training waits)": round(statistics.mean(s3_ckpt.writes) * 1000, 1),
              "upload_ms (beside training)": round(statistics.mean(s3_line.uploads) * 1000, 1)}
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    write_s = statistics.mean(writes)
    default_s = CheckpointEvery().seconds
    two = load_spec("studies/ptb_small.yaml", [f"trainer.limit_train_batches={args.windows}",
                                                "trainer.limit_val_batches=5", "trainer.max_epochs=2",
                                                "trainer.accelerator=cpu"])[0]
    before = redone(two, EpochOnly, args.windows + args.stop)
    after = redone(two, lambda d, k: LastCheckpoint(d, k, every_seconds=default_s), args.windows + args.stop)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(json.dumps({
        "device": "cpu", "threads": torch.get_num_threads(), "windows": args.windows,
        "ms_per_window": {"off": round(off, 2), f"on (every {args.every} windows)": round(on, 2),
                          "mlflow store (every {} windows)".format(args.every): round(mlflow_ms, 2)},
        "on / off": round(on / off, 4),
        "checkpoint": {"write_ms (training waits)": round(write_s * 1000, 1),
                       "mlflow_write_ms (training waits)": round(statistics.mean(ckpt.writes) * 1000, 1),
                       "mlflow_upload_ms (beside training)": round(statistics.mean(line.uploads) * 1000, 1)},
        f"slowdown at the default interval ({default_s:g} s)": f"{write_s / default_s:.4%}",
        "windows trained again after a SIGTERM": {"epoch-end checkpoints": before, "window checkpoints": after},
        **({f"s3 store (every {args.every} windows)": s3} if s3 else {}),
    }, indent=2))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stopping.request)
    main()

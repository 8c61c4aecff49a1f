"""Seconds to start: how long orch's commands take before they do their work, next to the floor
of any command that trains (a bare ``python -c "import torch, pytorch_lightning"``), in one run.

    python benchmarks/startup.py                       # echo study (CPU), 100-trial show
    ORCH_DATA_DIR=../shared/data python benchmarks/startup.py --study studies/ptb.yaml

Measured, each in a fresh temporary folder and a fresh orch cache:
- ``orch --help``;
- ``orch plugins list``, first (loads every plugin) and again (its cached listing);
- ``orch study show NAME`` and ``orch study best NAME`` on a study of ``--trials`` finished trials
  (written straight into its journal with Optuna: the command reads, it does not train);
- ``orch study run FILE``: seconds to its header line, and to its first trial's claim (the
  ``1 running`` progress line; the worker has opened the MLflow store by then). It is stopped
  there with SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ORCH = str(Path(sys.executable).with_name("orch"))


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return took


def fill(cwd: Path, env: dict, study: str, trials: int) -> str:
    """Create the study with orch, then add ``trials`` finished trials drawn from its space."""
    subprocess.run([ORCH, "study", "create", study], cwd=cwd, env=env, check=True, capture_output=True, timeout=600)
    code = f"""
import random, optuna
from optuna.trial import TrialState, create_trial
from orchestrator.spec.study import load_study
from orchestrator.storage import record
from orchestrator.storage.urls import default_storage_url
spec = load_study({study!r})
ostudy = record.load(default_storage_url(spec.name), spec.name)
rng = random.Random(0)
for _ in range({trials}):
    params, dists = {{}}, {{}}
    for key, p in spec.section.space.items():
        if p.type == "categorical":
            dists[key] = optuna.distributions.CategoricalDistribution(p.choices)
            params[key] = rng.choice(p.choices)
        elif p.type == "int":
            dists[key] = optuna.distributions.IntDistribution(p.low, p.high, log=p.log, step=p.step or 1)
            params[key] = p.low
        else:
            dists[key] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
            params[key] = rng.uniform(p.low, p.high)
    ostudy.add_trial(create_trial(params=params, distributions=dists, value=rng.random(), state=TrialState.COMPLETE,
                                  intermediate_values={{e: rng.random() for e in range(3)}}))
print(spec.name)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, check=True, capture_output=True,
                         text=True, timeout=600)
    return out.stdout.strip().splitlines()[-1]


def to_first_trial(cwd: Path, env: dict, study: str) -> tuple[float, float]:
    """Seconds from ``orch study run`` to its header, and to its first trial running."""
    start = time.perf_counter()
    proc = subprocess.Popen([ORCH, "study", "run", study, "--trials", "1"], cwd=cwd, env=env, text=True,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    header = running = None
    try:
        for line in proc.stderr:
            now = time.perf_counter() - start
            if header is None and "trials so far" in line:
                header = now
            if " 1 running" in line:
                running = now
                break
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    if header is None or running is None:
        raise SystemExit(f"orch study run {study} never reached its first trial (exit {proc.returncode})")
    return header, running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="studies/echo.yaml")
    parser.add_argument("--trials", type=int, default=100, help="finished trials in the study that show reads")
    args = parser.parse_args()
    study = str(Path(args.study).resolve())
    rows = []
    with tempfile.TemporaryDirectory(prefix="orch-startup-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "ORCH_CACHE_DIR": str(root / "cache"), "COLUMNS": "160"}
        floor = timed([sys.executable, "-c", "import torch, pytorch_lightning"], root, env)
        rows.append(("python -c 'import torch, pytorch_lightning' (floor)", floor))
        rows.append(("orch --help", timed([ORCH, "--help"], root, env)))
        rows.append(("orch plugins list (first: loads the plugins)", timed([ORCH, "plugins", "list"], root, env)))
        rows.append(("orch plugins list (again: cached listing)", timed([ORCH, "plugins", "list"], root, env)))
        shown = root / "shown"
        shown.mkdir()
        name = fill(shown, env, study, args.trials)
        rows.append((f"orch study show {name} ({args.trials} trials)",
                     timed([ORCH, "study", "show", name], shown, env)))
        rows.append((f"orch study best {name}", timed([ORCH, "study", "best", name], shown, env)))
        fresh = root / "fresh"
        fresh.mkdir()
        header, running = to_first_trial(fresh, env, study)
        rows.append((f"orch study run {Path(study).name}: to the header (new MLflow store)", header))
        rows.append((f"orch study run {Path(study).name}: to the first trial running", running))
        shutil.rmtree(fresh / "mlruns", ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    for label, took in rows:
        print(f"{label:<{width}}  {took:6.2f} s  (x{took / floor:.2f} of the floor)")
    print(json.dumps({label: round(took, 3) for label, took in rows}))


if __name__ == "__main__":
    main()

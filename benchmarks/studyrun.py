"""Run the real ``orch study run`` command on a fresh study in a temporary directory (for benchmarks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def study_run(study: str, *, workers: int | None, trials: int, overrides: list[str], inspect=None,
              options: list[str] = ()):
    """``orch study run`` in a temporary directory (``workers``: ``--workers``, CPU slots; ``options``:
    more of its options); returns (its JSON summary, wall seconds, inspect(cwd))."""
    with tempfile.TemporaryDirectory() as cwd:
        cmd = [sys.executable, "-m", "orchestrator.cli", "study", "run", study, "--trials", str(trials),
               *(["--workers", str(workers)] if workers else []), *options]
        cmd += [a for o in overrides for a in ("--set", o)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=os.environ)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            sys.exit(f"orch study run failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout), wall, inspect(cwd) if inspect else None

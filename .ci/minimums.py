"""Print pip pins of the lowest versions pyproject.toml allows for orch's key libraries, for the
CI run that keeps those lower bounds honest (.ci/run installs them and runs the default suite).

torch is not among them: the oldest PyTorch in range here would be a multi-GB CUDA build; its
lower bound is the version orch was run on, on a GPU machine (README, "Supported versions")."""

import re
import sys
from pathlib import Path

import tomllib

KEY = ("optuna", "mlflow", "pytorch-lightning", "sqlalchemy")

deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
for dep in deps:
    name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower()
    if name in KEY:
        low = re.search(r">=\s*([0-9][^,\s;]*)", dep)
        if not low:
            sys.exit(f"{dep}: no lower bound (>=) declared")
        print(f"{name}=={low.group(1)}")

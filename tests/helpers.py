"""Helpers the tests share: tiny data, study files, orch in real processes, the stores a study
leaves, and the services (PostgreSQL, an MLflow server) the distributed tests need. Fixtures
built on them are in ``conftest.py``."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NAMES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")


def shared_ptb_dir() -> Path | None:
    """The shared Penn Treebank copy (``$ORCH_DATA_DIR/ptb`` or ``../shared/data/ptb``), if present."""
    root = os.environ.get("ORCH_DATA_DIR")
    candidates = [Path(root) / "ptb"] if root else []
    candidates.append(REPO.parent / "shared" / "data" / "ptb")
    return next((c for c in candidates if all((c / n).is_file() for n in NAMES)), None)


def write_corpus(folder: Path, seed: int = 0) -> dict[str, str]:
    """A tiny PTB-like corpus in ``folder``; returns its SHA-256 per file name."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(30)] + ["<unk>", "N"]
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for name, n_lines in zip(NAMES, (120, 30, 25)):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(n_lines)]
        if name == "ptb.train.txt":
            lines.append(" ".join(words))  # every word occurs in train
        data = ("".join(f" {line} \n" for line in lines)).encode()
        (folder / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums



# ---- studies in real processes ------------------------------------------------------------------
FLAKY = """
[orch.modules]
flaky = flaky_module:Flaky
"""

FLAKY_SRC = """
import os
import time
from orch_plugins.modules import StepClassification

class Flaky(StepClassification):
    '''Trains like step_classification, or raises, or produces a NaN loss, or kills its process, or
    hangs (0.2 s a training step, until the file ``release`` exists, if given).'''

    def __init__(self, cell, info, mode: str = "ok", release: str = "", **kwargs):
        super().__init__(cell, info, **kwargs)
        self.mode = mode
        self.release = release

    def loss(self, pred, y):
        loss = super().loss(pred, y)
        if self.training and self.mode == "raise":
            raise RuntimeError("boom: this trial raises")
        if self.training and self.mode == "nan":
            return loss * float("nan")
        if self.training and self.mode == "die":
            os._exit(3)  # the worker process dies mid-step
        if self.training and self.mode == "hang" and not (self.release and os.path.exists(self.release)):
            time.sleep(0.2)
        return loss
"""


def echo_study(**study):
    return {
        "name": "tiny",
        "seed": 0,
        "dataset": {"plugin": "echo", "length": 1500, "val_length": 300},
        "cell": {"plugin": "lstm", "hidden_size": 8},
        "module": {"plugin": "step_classification", "lr": 0.01},
        "trainer": {"max_epochs": 1, "accelerator": "cpu"},
        "study": {"metric": "val_acc", "direction": "maximize", "trials": 4,
                  "sampler": {"type": "random", "seed": 0}, **study},
    }


def write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def start(*args, cwd, env=None, log: Path | None = None):
    """`orch ...` in its own process group (so that a whole "machine" can be killed at once)."""
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, stdout=out,
                            stderr=subprocess.STDOUT if log else subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def journal(root: Path, name: str = "tiny") -> Path:
    """The default journal file of study ``name`` run in the folder ``root``."""
    return root / "mlruns" / "optuna" / f"{name}.journal"


def orch(*args, cwd, env=None, timeout=600):
    """`orch ...` in a real process (workers are spawned processes)."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def stop_group(proc, timeout: float = 20) -> None:
    """SIGTERM to the process group of ``proc`` (started with ``start_new_session``), SIGKILL if it lingers."""
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def load(tmp_path, name="tiny"):
    """The journal study ``name`` under ``tmp_path/mlruns``, its MLflow client, parent and child runs."""
    import mlflow
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal(tmp_path, name))))
    study = optuna.load_study(study_name=name, storage=storage)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    return (study, client, *runs_of(client, name))


def runs_of(client, name):
    """The parent and child runs of study ``name``, from its one MLflow experiment."""
    from mlflow.entities import ViewType

    experiments = [e for e in client.search_experiments(view_type=ViewType.ALL) if e.name == name]
    assert len(experiments) == 1, experiments
    runs = client.search_runs([experiments[0].experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("orch.role") == "study"]
    children = [r for r in runs if r.data.tags.get("orch.role") == "trial"]
    return parents, children


STATES = {"COMPLETE": ("complete", "FINISHED"), "PRUNED": ("pruned", "FINISHED"), "FAIL": ("failed", "FAILED")}


def expected_state(trial) -> tuple[str, str]:
    """The ``orch.state`` tag and MLflow status that a finished trial's run must have."""
    if trial.state.name == "FAIL" and trial.user_attrs.get("orch.interrupted"):
        return "interrupted", "KILLED"
    if trial.state.name == "FAIL" and trial.user_attrs.get("orch.lost"):
        return "lost", "KILLED"
    return STATES[trial.state.name]


def check_agreement(study, parents, children):
    """Exactly one child run per trial, under the one parent run, in the same final state."""
    assert len(parents) == 1
    by_trial = {}
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        number = int(r.data.tags["orch.trial"])
        assert number not in by_trial, f"two MLflow runs for trial {number}"
        by_trial[number] = r
    trials = study.get_trials(deepcopy=False)
    assert sorted(by_trial) == [t.number for t in trials]
    for t in trials:
        run = by_trial[t.number]
        assert (run.data.tags["orch.state"], run.info.status) == expected_state(t), t.number
        state, name = expected_state(t)[0], run.info.run_name  # names read in a list: number, values, state
        assert name.startswith(f"trial-{t.number}"), name
        if t.params:
            assert all(f"{k.rsplit('.', 1)[-1]}=" in name or str(v) in name for k, v in t.params.items()), name
        assert name.endswith(f" [{state}]") == (state != "complete"), name
        assert t.user_attrs["orch.mlflow_run_id"] == run.info.run_id
    return by_trial


# ---- services: PostgreSQL and an MLflow tracking server ----------------------------------------------
#: set by .ci/run: a test that needs PostgreSQL or a browser fails instead of skipping
REQUIRE_SERVICES = os.environ.get("ORCH_REQUIRE_SERVICES") == "1"
PG_ADMIN = os.environ.get("ORCH_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def unavailable(reason: str):
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason}; ORCH_REQUIRE_SERVICES=1 (set by .ci/run) requires this test to run")
    pytest.skip(reason)


def _pg_admin():
    import sqlalchemy

    engine = sqlalchemy.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - no server, no driver, refused
        unavailable(f"no PostgreSQL server at {PG_ADMIN} ({type(exc).__name__}: {exc})")
    return engine


class Databases:
    """Creates PostgreSQL databases of its own (``url = make()``) and drops them all afterwards."""

    def __init__(self):
        self.engine = _pg_admin()
        self.names = []

    def make(self, password: str | None = None) -> str:
        """A new empty database; its URL carries ``password`` (percent-encoded) if given."""
        import uuid
        from urllib.parse import quote

        import sqlalchemy

        name = f"orch_test_{uuid.uuid4().hex[:12]}"
        with self.engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        url = sqlalchemy.engine.make_url(PG_ADMIN).set(database=name)
        text = url.render_as_string(hide_password=False)
        if password is not None:  # trust authentication: the server does not check it
            user = url.username or "postgres"
            text = text.replace(f"://{user}@", f"://{user}:{quote(password, safe='')}@", 1)
        return text

    def drop(self):
        import sqlalchemy

        with self.engine.connect() as conn:
            for name in self.names:
                conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.engine.dispose()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_in_group(pgid: int, wait: float = 10.0) -> list[int]:
    """Pids of the processes of group ``pgid`` still alive (zombies aside) after up to ``wait`` seconds."""
    import time

    deadline = time.time() + wait
    while True:
        alive = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                alive.append(int(entry))
        if not alive or time.time() >= deadline:
            return alive
        time.sleep(0.2)

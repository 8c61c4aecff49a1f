"""Orchestration cost per trial: what orch spends around a trial, with no training in it.

    python benchmarks/orchestration.py                              # journal vs PostgreSQL, 1 and 8 workers
    python benchmarks/orchestration.py --workers 1 4 --trials 64 --postgres postgresql://postgres@127.0.0.1/postgres

For each storage and number of concurrent worker processes, a fresh study is created (through
``orch``'s own :func:`orchestrator.execution.opening.open_study`) and the workers run the real per-trial path
of :mod:`orchestrator.execution.workers` with the training left out: claim (the study's lock, reaping lost
trials, counting the budget, Optuna's ask), sampling the parameters, creating the MLflow child
run, one heartbeat (RDB storages), then closing the MLflow run and Optuna's tell. All
configurations log to one kind of MLflow store (SQLite in a temporary folder, or
``--tracking-uri``), so the storages are compared on equal terms, in one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("claim", "sample", "child_run", "heartbeat", "finish")


def _study(folder: Path):
    import yaml

    from orchestrator.spec.study import load_study

    data = {"name": "bench", "seed": 0,
            "dataset": {"plugin": "echo", "length": 1000}, "cell": {"plugin": "lstm", "hidden_size": 8},
            "module": {"plugin": "step_classification", "lr": 0.01}, "trainer": {"max_epochs": 1},
            "study": {"metric": "val_acc", "direction": "maximize", "sampler": {"type": "random", "seed": 0},
                      "space": {"module.lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True},
                                "cell.forget_bias": {"type": "float", "low": 0.0, "high": 2.0}}}}
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_study(path)


def _worker(study, storage_url: str, tracking_uri: str, parent: str, queue) -> None:
    import optuna

    from orchestrator import schema
    from orchestrator.execution import claims
    from orchestrator.spec.samplers import make_sampler
    from orchestrator.spec.space import suggest
    from orchestrator.storage import optuna_api, owners, record
    from orchestrator.storage.backends import open_storage
    from orchestrator.tracking import client as tracking
    from orchestrator.tracking.runs import end_run, start_run

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    ostudy = optuna.load_study(study_name=study.name, storage=open_storage(storage_url, study.section.heartbeat))
    mlf = tracking.client(tracking_uri)
    lock = claims.claim_lock(storage_url, study.name)
    with lock:
        offset = record.next_sampler_offset(ostudy)
    ostudy.sampler = make_sampler(study.section, offset=offset)
    spent = dict.fromkeys(PHASES, 0.0)
    n = 0
    began = time.time()
    while True:
        t = time.perf_counter()
        trial = claims.claim(ostudy, lock, None, mlf, poll=0.05)
        spent["claim"] += time.perf_counter() - t
        if trial is None:
            break
        t = time.perf_counter()
        suggest(trial, study.section, study.data)
        spent["sample"] += time.perf_counter() - t
        t = time.perf_counter()
        run_id = start_run(mlf, study.name, run_name=f"trial-{trial.number}", parent_run_id=parent,
                           tags={schema.STUDY: study.name, schema.TRIAL: str(trial.number), schema.ROLE: "trial",
                                 schema.RUN_WORKER: owners.worker_id()})
        trial.set_user_attr(schema.RUN_ID, run_id)
        spent["child_run"] += time.perf_counter() - t
        t = time.perf_counter()
        if optuna_api.heartbeat_enabled(ostudy):
            optuna_api.record_heartbeat(ostudy, trial)
        spent["heartbeat"] += time.perf_counter() - t
        t = time.perf_counter()
        mlf.log_metric(run_id, schema.OBJECTIVE, 0.5)
        end_run(mlf, run_id, "complete")
        ostudy.tell(trial, 0.5)
        spent["finish"] += time.perf_counter() - t
        n += 1
    queue.put((n, spent, began, time.time()))


def measure(kind: str, url: str, tracking_uri: str, workers: int, trials: int, folder: Path) -> dict:
    from orchestrator.execution.opening import open_study

    study = _study(folder)
    joined = open_study(study, url, create=True, tracking_uri=tracking_uri, budget=trials)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(study, url, joined.tracking_uri, joined.parent_run_id, queue))
             for _ in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    wall = max(r[3] for r in results) - min(r[2] for r in results)  # first claim to last tell, start-up aside
    done = sum(r[0] for r in results)
    per_trial = {phase: 1000 * sum(r[1][phase] for r in results) / max(done, 1) for phase in PHASES}
    trials_now = len(joined.ostudy.get_trials(deepcopy=False))
    return {"storage": kind, "workers": workers, "trials": done, "trials_in_study": trials_now,
            "ms_per_trial": {k: round(v, 1) for k, v in per_trial.items()},
            "ms_per_trial_total": round(sum(per_trial.values()), 1),
            "wall_s": round(wall, 2), "trials_per_s": round(done / wall, 2)}


def _postgres_database(admin: str):
    import sqlalchemy

    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    name = f"orch_bench_{uuid.uuid4().hex[:10]}"
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = sqlalchemy.engine.make_url(admin).set(database=name).render_as_string(hide_password=False)

    def drop():
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    return url, drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--trials", type=int, default=48, help="trials per configuration")
    parser.add_argument("--storages", nargs="+", default=["journal", "postgresql"])
    parser.add_argument("--postgres", default=os.environ.get("ORCH_TEST_POSTGRES",
                                                             "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
                        help="an administrator URL of the PostgreSQL server (a database is created per configuration)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: SQLite in a temporary folder)")
    args = parser.parse_args()
    rows = []
    for kind in args.storages:
        for n in args.workers:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                drop = None
                if kind == "journal":
                    url = f"journal:{folder / 'bench.journal'}"
                else:
                    url, drop = _postgres_database(args.postgres)
                tracking_uri = args.tracking_uri or f"sqlite:///{folder / 'mlflow.db'}"
                try:
                    row = measure(kind, url, tracking_uri, n, args.trials, folder)
                finally:
                    if drop:
                        drop()
            rows.append(row)
            phases = ", ".join(f"{k} {v}" for k, v in row["ms_per_trial"].items())
            print(f"{kind:10s} {n} worker(s): {row['trials']} trials ({row['trials_in_study']} in the study), "
                  f"{row['ms_per_trial_total']} ms of orchestration per trial ({phases}); "
                  f"{row['trials_per_s']} trials/s over {row['wall_s']} s", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

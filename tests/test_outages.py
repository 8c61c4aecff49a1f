"""Outages of the stores a study writes to, against servers the tests own: a PostgreSQL cluster
stopped and started (``initdb``/``pg_ctl`` on a free port), an ``mlflow server`` killed with
SIGKILL and started again on its port, a worker process stopped with SIGSTOP past the grace period
(a network partition); and the heartbeat race of a trial that ends normally."""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
import time

import mlflow
import optuna
import pytest

from orchestrator.outages import Outage, Unavailable, Unreachable, connection_problem, no_wait

from helpers import FLAKY, FLAKY_SRC, check_agreement, echo_study, orch, runs_of, start, stop_group, write
from servers import MlflowServer, postgres_cluster, wait_for

CONTINUOUS = {"module.lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True},
              "cell.forget_bias": {"type": "float", "low": 0.0, "high": 2.0}}


def pg_study(url: str, name: str = "tiny"):
    """The study, read through connections closed after each use (a poll every 0.2 s would otherwise
    keep a pool of connections per call open until garbage collection: too many clients)."""
    from sqlalchemy.pool import NullPool

    return optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(
        url, engine_kwargs={"poolclass": NullPool}))


def journal_study(root, name: str = "tiny"):
    from helpers import journal

    backend = optuna.storages.journal.JournalFileBackend(str(journal(root, name)))
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


def slow_study(tmp_path, fake_dist, *, trials: int, epochs: int, **study):
    """A study whose every training step sleeps 0.2 s (the flaky module's ``hang`` mode, never
    released): trials that last long enough to be cut by an outage."""
    root = fake_dist("flaky-module", FLAKY, {"flaky_module": FLAKY_SRC})
    data = echo_study(trials=trials, space=CONTINUOUS, **study)
    data["module"] = {"plugin": "flaky", "lr": 0.01, "mode": "hang", "release": str(tmp_path / "never")}
    data["dataset"].update(length=400, val_length=100)
    data["trainer"]["max_epochs"] = epochs
    return write(tmp_path / "tiny.yaml", data), {"PYTHONPATH": str(root)}


def no_tracebacks(*texts):
    for text in texts:
        assert "Traceback" not in text, text[-4000:]
        assert "exceeding max length" not in text, text[-4000:]


def epochs_once(client, run_id: str, metric: str, epochs: int) -> None:
    """Every epoch of the run logged once, in order."""
    steps = [m.step for m in client.get_metric_history(run_id, metric)]
    assert sorted(steps) == list(range(epochs)), (run_id, steps)


# ---- the parts, on their own -------------------------------------------------------------------------

def test_connection_errors_are_told_apart_from_errors_that_retrying_cannot_fix():
    import sqlalchemy

    refused = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception(
        'connection failed: connection to server at "127.0.0.1", port 5 failed: Connection refused'))
    assert connection_problem(refused) == "connection refused"
    cut = optuna.exceptions.StorageInternalError("An exception is raised during the commit. This typically happens "
                                                  "due to invalid data in the commit, e.g. exceeding max length.")
    cut.__cause__ = sqlalchemy.exc.OperationalError("COMMIT", {}, Exception(
        "terminating connection due to administrator command"))
    assert connection_problem(cut) == "the server is restarting"
    assert connection_problem(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")) == "connection refused"
    assert connection_problem(mlflow.exceptions.MlflowException(
        "API request to http://h:5000/api/2.0/mlflow/runs/log-batch failed with exception HTTPConnectionPool("
        "host='h', port=5000): Max retries exceeded with url")) == "no answer"
    # what retrying cannot fix is raised at once
    assert connection_problem(sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key value"))) is None
    assert connection_problem(RuntimeError("Trial#3 has already finished and can not be updated.")) is None
    assert connection_problem(OSError(errno.ENOSPC, "No space left on device")) is None
    assert connection_problem(ValueError("bad value")) is None


def test_an_outage_is_waited_out_with_backoff_and_given_up_after_its_window():
    said, calls = [], []

    def flaky(answer_after: float, started: float):
        calls.append(time.monotonic())
        if time.monotonic() - started < answer_after:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return "ok"

    outage = Outage("the store X", window=5, say=said.append)
    assert outage.call(flaky, 1.2, time.monotonic()) == "ok"  # waited out
    assert said == ["the store X does not answer (connection refused); waiting up to 5 s for it",
                    said[1]] and said[1].startswith("the store X answers again, after")
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps == sorted(gaps) and gaps[0] >= 0.45  # exponential backoff: 0.5, 1, ...
    assert outage.since is None and not outage.quiet_for(60) and outage.quiet_for(0)

    with no_wait(), pytest.raises(Unavailable):  # inside no_wait a call does not wait
        outage.call(flaky, 60, time.monotonic())
    started = time.monotonic()
    with pytest.raises(Unreachable, match=r"the store X did not answer for 5 s \(connection refused\)"):
        outage.call(flaky, 60, time.monotonic())
    assert 3 < time.monotonic() - started < 7
    with pytest.raises(Unreachable):  # and from then on every call fails at once
        outage.call(lambda: "ok")


def test_a_retry_lost_before_drawing_its_parameters_is_queued_again_with_them():
    from orchestrator.execution.claims import requeue
    from orchestrator.execution.outcomes import end_for_worker

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))  # trial 0, which was lost
    study.enqueue_trial({"x": 0.25}, user_attrs={"orch.retry_of": 0})
    popped = study.ask()  # its retry; its worker died right after claiming it: no parameter drawn yet
    assert popped.params == {}
    [ended] = end_for_worker(study, [study.trials[1]], lambda t: "lost: test", "lost")
    assert ended.retried
    requeue(study)
    [again] = [t for t in study.trials if t.state.name == "WAITING"]
    assert again.system_attrs["fixed_params"] == {"x": 0.25} and again.user_attrs["orch.retry_of"] == popped.number


def test_a_lease_ends_quietly_with_its_trial_and_learns_when_another_process_took_the_trial(tmp_path):
    """The heartbeat race: a trial this worker ends itself is never taken for a lost one, however
    the beats fall; one that another process ended is, within one interval."""
    from orchestrator.execution import stopping
    from orchestrator.execution.lease import Lease
    from orchestrator.spec.study import HeartbeatSettings
    from orchestrator.storage.backends import open_storage

    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url, HeartbeatSettings(interval=1,
                                                                                              grace_period=5)))
    for _ in range(3):
        trial = study.ask()
        with Lease(study, trial) as lease:
            time.sleep(0.3)
            lease.finishing()
            study.tell(trial, 1.0)
            time.sleep(2.5)  # beats after the tell
            assert not lease.lost and lease.may_write()
    assert stopping.requested() is None

    trial = study.ask()
    other = optuna.load_study(study_name="s", storage=open_storage(url))
    with Lease(study, trial) as lease:
        other.tell(trial.number, state=optuna.trial.TrialState.FAIL)  # declared lost elsewhere
        wait_for(lambda: lease.lost, 3, what="the lease lost")
        assert not lease.may_write()
    assert stopping.requested() is None  # a lost trial is not a stop signal


def test_a_heartbeat_thread_reaps_only_when_the_claim_lock_is_free(tmp_path, databases):
    """Reaping from a heartbeat thread never waits for the claim lock (a holder cut off from the
    server must not stall the heartbeats): held elsewhere, it is skipped."""
    from orchestrator.storage.locks import if_free, store_lock
    from orchestrator.storage.urls import connect_args

    for url in (databases.make(), f"journal:{tmp_path / 'j.journal'}"):
        holder, other = store_lock(url, "claim:s"), store_lock(url, "claim:s")
        with holder:
            started = time.monotonic()
            with if_free(other) as held:
                assert held is False
            assert time.monotonic() - started < 5
        with if_free(other) as held:
            assert held is True
            with if_free(holder) as again:
                assert again is False
    # a server that does not answer fails a try in seconds, unless the URL says otherwise
    assert connect_args("postgresql://u@h/db")["connect_timeout"] == 10
    assert "connect_timeout" not in connect_args("postgresql://u@h/db?connect_timeout=3")
    assert connect_args("sqlite:///x.db") == {}


def test_the_storage_of_a_trial_waits_out_a_database_restart(tmp_path):
    """An Optuna storage through orch's proxy: a call made while the database is stopped waits and
    succeeds once it is back; past the window it gives up with one clear line."""
    from orchestrator.storage.backends import open_storage
    from orchestrator.storage.retrying import retrying

    with postgres_cluster() as pg:
        url = pg.create_database()
        said = []
        outage = Outage("the Optuna storage db", window=60, say=said.append)
        storage = retrying(optuna.storages.get_storage(open_storage(url)), outage)
        study = optuna.create_study(study_name="s", storage=storage)
        trial = study.ask()
        pg.stop()
        threading.Timer(3, pg.start).start()
        started = time.monotonic()
        trial.report(0.5, 0)  # waits for the database
        study.tell(trial, 1.0)
        assert time.monotonic() - started >= 2.5
        assert said[0].startswith("the Optuna storage db does not answer (")
        assert said[1].startswith("the Optuna storage db answers again")
        assert pg_study(url, "s").trials[0].state.name == "COMPLETE"
        assert pg_study(url, "s").trials[0].intermediate_values == {0: 0.5}

        short = Outage("the Optuna storage db", window=2, say=said.append)
        storage = retrying(optuna.storages.get_storage(open_storage(url)), short)
        pg.stop()
        with pytest.raises(Unreachable, match="did not answer for 2 s"):
            optuna.load_study(study_name="s", storage=storage).ask()


# ---- a study through outages, end to end ---------------------------------------------------------------

@pytest.mark.slow
def test_a_database_stopped_for_30_s_mid_study_costs_no_trial(tmp_path, fake_dist):
    """Two `study worker` processes; PostgreSQL stopped for 30 s while both train: no trial fails,
    no traceback, the exact budget of complete trials, every epoch reported once."""
    with postgres_cluster() as pg:
        storage = pg.create_database()
        path, env = slow_study(tmp_path, fake_dist, trials=4, epochs=4)
        created = orch("study", "create", path, "--storage", storage, cwd=tmp_path, env=env)
        assert created.returncode == 0, created.stderr
        workers = [start("study", "worker", path, "--storage", storage, cwd=tmp_path, env=env,
                         log=tmp_path / f"w{i}.log") for i in range(2)]
        wait_for(lambda: sum(bool(t.intermediate_values) for t in pg_study(storage).trials
                             if t.state.name == "RUNNING") >= 2, 240, what="two trials past their first epoch")
        pg.stop()
        time.sleep(30)
        pg.start()
        for w in workers:
            assert w.wait(timeout=600) == 0, (tmp_path / "w0.log").read_text()[-3000:]
        logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
        no_tracebacks(*logs)
        assert any("does not answer" in log and "answers again" in log for log in logs), logs[0][-3000:]
        study = pg_study(storage)
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
        assert all(sorted(t.intermediate_values) == [0, 1, 2, 3] for t in study.trials)
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
        by_trial = check_agreement(study, *runs_of(client, "tiny"))
        for run in by_trial.values():
            epochs_once(client, run.info.run_id, "val_acc", 4)


@pytest.mark.slow
def test_a_database_away_longer_than_the_window_interrupts_and_the_next_run_resumes(tmp_path, fake_dist):
    with postgres_cluster() as pg:
        storage = pg.create_database()
        path, env = slow_study(tmp_path, fake_dist, trials=3, epochs=3, outage_grace=8,
                               heartbeat={"interval": 2, "grace_period": 20})
        created = orch("study", "create", path, "--storage", storage, cwd=tmp_path, env=env)
        assert created.returncode == 0, created.stderr
        run = start("study", "run", path, "--storage", storage, "--workers", "2", cwd=tmp_path, env=env,
                    log=tmp_path / "run.log")
        wait_for(lambda: sum(bool(t.intermediate_values) for t in pg_study(storage).trials
                             if t.state.name == "RUNNING") >= 2, 240, what="two trials past their first epoch")
        params = {t.number: t.params for t in pg_study(storage).trials if t.state.name == "RUNNING"}
        pg.stop()
        assert run.wait(timeout=180) == 1
        log = (tmp_path / "run.log").read_text()
        no_tracebacks(log)
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and re.search(r"the Optuna storage postgresql\+psycopg://postgres@127\.0\.0\.1:\d+/"
                                              r"\w+ did not answer for 8 s", errors[0]), log[-3000:]
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
        _, children = runs_of(client, "tiny")
        cut = [r for r in children if r.data.tags.get("orch.trial") in {str(n) for n in params}]
        assert cut and all(r.info.status == "KILLED" and r.data.tags["orch.state"] == "interrupted" for r in cut)

        pg.start()
        again = orch("study", "run", path, "--storage", storage, "--workers", "2", cwd=tmp_path, env=env)
        assert again.returncode == 0, again.stderr
        no_tracebacks(again.stdout, again.stderr)
        study = pg_study(storage)
        for number, drawn in params.items():
            t = study.trials[number]
            assert t.state.name == "FAIL" and t.user_attrs.get("orch.interrupted") is True, t.user_attrs
            assert not t.user_attrs.get("orch.lost")
            [retry] = [r for r in study.trials if r.user_attrs.get("orch.retry_of") == number]
            assert retry.params == drawn and retry.state.name == "COMPLETE"
        assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3
        check_agreement(study, *runs_of(client, "tiny"))


@pytest.mark.slow
def test_a_tracking_server_killed_for_30_s_mid_study_costs_no_trial_and_no_epoch(tmp_path, fake_dist):
    with MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server") as server:
        path, env = slow_study(tmp_path, fake_dist, trials=4, epochs=4)
        created = orch("study", "create", path, "--tracking-uri", server.url, cwd=tmp_path, env=env)
        assert created.returncode == 0, created.stderr
        workers = [start("study", "worker", path, "--tracking-uri", server.url, cwd=tmp_path, env=env,
                         log=tmp_path / f"w{i}.log") for i in range(2)]
        wait_for(lambda: sum(bool(t.intermediate_values) for t in journal_study(tmp_path).trials
                             if t.state.name == "RUNNING") >= 2, 240, what="two trials past their first epoch")
        server.kill()
        time.sleep(30)
        server.start()
        for i, w in enumerate(workers):
            assert w.wait(timeout=600) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
        logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
        no_tracebacks(*logs)
        assert any("does not answer" in log and "answers again" in log for log in logs), logs[0][-3000:]
        assert not any("restarting it" in log for log in logs)
        study = journal_study(tmp_path)
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
        client = mlflow.MlflowClient(server.url)
        by_trial = check_agreement(study, *runs_of(client, "tiny"))
        for run in by_trial.values():
            epochs_once(client, run.info.run_id, "val_acc", 4)


@pytest.mark.slow
def test_a_tracking_server_away_longer_than_the_window_interrupts_and_the_next_run_resumes(tmp_path, fake_dist):
    with MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server") as server:
        path, env = slow_study(tmp_path, fake_dist, trials=3, epochs=3, outage_grace=10)
        created = orch("study", "create", path, "--tracking-uri", server.url, cwd=tmp_path, env=env)
        assert created.returncode == 0, created.stderr
        run = start("study", "run", path, "--tracking-uri", server.url, "--workers", "2", cwd=tmp_path, env=env,
                    log=tmp_path / "run.log")
        wait_for(lambda: sum(bool(t.intermediate_values) for t in journal_study(tmp_path).trials
                             if t.state.name == "RUNNING") >= 2, 240, what="two trials past their first epoch")
        params = {t.number: t.params for t in journal_study(tmp_path).trials if t.state.name == "RUNNING"}
        server.kill()
        assert run.wait(timeout=240) == 1
        log = (tmp_path / "run.log").read_text()
        no_tracebacks(log)
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"the MLflow tracking store {server.url} did not answer for 10 s" in errors[0], log
        assert "restarting it" not in log
        study = journal_study(tmp_path)
        for number in params:
            assert study.trials[number].user_attrs.get("orch.interrupted") is True

        server.start()
        again = orch("study", "run", path, "--tracking-uri", server.url, "--workers", "2", cwd=tmp_path, env=env)
        assert again.returncode == 0, again.stderr
        no_tracebacks(again.stdout, again.stderr)
        study = journal_study(tmp_path)
        for number, drawn in params.items():
            [retry] = [r for r in study.trials if r.user_attrs.get("orch.retry_of") == number]
            assert retry.params == drawn and retry.state.name == "COMPLETE"
        assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3
        client = mlflow.MlflowClient(server.url)
        by_trial = check_agreement(study, *runs_of(client, "tiny"))  # no run left RUNNING
        for number in params:
            assert by_trial[number].info.status == "KILLED"
            assert by_trial[number].data.tags["orch.state"] == "interrupted"


@pytest.mark.slow
def test_a_worker_cut_off_past_the_grace_period_loses_its_trial_to_a_busy_study(tmp_path, fake_dist, databases):
    """SIGSTOP stands in for a partition: the trial of the stopped worker is declared lost and
    queued again within one heartbeat interval of the grace period while the other worker is busy
    training; woken, the stopped worker stops that trial without writing into its run."""
    storage = databases.make()
    path, env = slow_study(tmp_path, fake_dist, trials=3, epochs=6, heartbeat={"interval": 2, "grace_period": 8})
    created = orch("study", "create", path, "--storage", storage, cwd=tmp_path, env=env)
    assert created.returncode == 0, created.stderr
    nodes = [start("study", "worker", path, "--storage", storage, cwd=tmp_path, env=env, log=tmp_path / f"n{i}.log")
             for i in range(2)]
    try:
        wait_for(lambda: sum(bool(t.intermediate_values) for t in pg_study(storage).trials
                             if t.state.name == "RUNNING") >= 2, 240, what="two trials past their first epoch")
        victim = next(t for t in pg_study(storage).trials if t.state.name == "RUNNING")
        pid = int(victim.user_attrs["orch.worker"].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.time()
        lost = wait_for(lambda: pg_study(storage).trials[victim.number].user_attrs.get("orch.lost"), 60,
                        what="the stopped worker's trial declared lost")
        found_after = time.time() - stopped_at
        assert found_after <= 8 + 2 + 4, found_after  # the grace period, one interval, the poll and some slack
        study = pg_study(storage)
        busy = [t for t in study.trials if t.state.name == "RUNNING" and t.number != victim.number]
        assert busy, "the other worker was busy with a trial of its own"
        assert any(t.user_attrs.get("orch.retry_of") == victim.number for t in study.trials)
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
        run_id = victim.user_attrs["orch.mlflow_run_id"]
        wait_for(lambda: client.get_run(run_id).info.status == "KILLED", 30, what="its run closed as lost")
        closed = client.get_run(run_id)
        time.sleep(2)
        os.kill(pid, signal.SIGCONT)
        for node in nodes:
            assert node.wait(timeout=600) == 0
        after = client.get_run(run_id)
        assert after.info.end_time == closed.info.end_time and after.data.tags["orch.state"] == "lost"
        assert {k: len(client.get_metric_history(run_id, k)) for k in after.data.metrics} == \
            {k: len(client.get_metric_history(run_id, k)) for k in closed.data.metrics}
        logs = "".join((tmp_path / f"n{i}.log").read_text() for i in range(2))
        assert f"trial {victim.number} was declared lost by another process" in logs
        assert "stopped by a signal" not in logs
        no_tracebacks(logs)
        study = pg_study(storage)
        assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3 and lost
        check_agreement(study, *runs_of(client, "tiny"))
    finally:
        for node in nodes:
            if node.poll() is None:
                stop_group(node)


@pytest.mark.slow
def test_a_hundred_short_trials_with_a_one_second_heartbeat_never_stop_their_worker(tmp_path, databases):
    storage = databases.make()
    data = echo_study(trials=100, heartbeat={"interval": 1, "grace_period": 10})
    data["trainer"]["max_epochs"] = 2  # a second or two each: a few heartbeats per trial
    path = write(tmp_path / "tiny.yaml", data)
    done = orch("study", "run", path, "--storage", storage, "--workers", "2", cwd=tmp_path, timeout=1200)
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "exited with code" not in out and "stopped by a signal" not in out, out[-3000:]
    no_tracebacks(out)
    assert sum(t.state.name == "COMPLETE" for t in pg_study(storage).trials) == 100


@pytest.mark.slow
def test_a_worker_slot_whose_process_keeps_dying_is_restarted_a_bounded_number_of_times(tmp_path, fake_dist):
    """Every trial kills its worker process: the slot is restarted 4 times, then left empty (not
    reset by the lost trials); each retry carries its line's parameters; one line per death."""
    root = fake_dist("flaky-module", FLAKY, {"flaky_module": FLAKY_SRC})
    data = echo_study(trials=6, space=CONTINUOUS)
    data["module"] = {"plugin": "flaky", "lr": 0.01, "mode": "die"}
    path = write(tmp_path / "tiny.yaml", data)
    done = orch("study", "run", path, "--workers", "1", cwd=tmp_path, env={"PYTHONPATH": str(root)})
    out = done.stdout + done.stderr
    no_tracebacks(out)
    deaths = [line for line in out.splitlines() if "exited with code 3" in line]
    assert len(deaths) == 5 and "restarting it" in deaths[0] and "restarting it" not in deaths[-1], out
    assert "its workers died 5 times in 10 minutes, so it is not restarted" in deaths[-1]
    study = journal_study(tmp_path)
    for t in study.trials:
        if t.user_attrs.get("orch.retry_of") is not None and t.state.name != "WAITING":
            assert t.params == study.trials[t.user_attrs["orch.retry_of"]].params
    assert not any(t.state.name == "RUNNING" for t in study.trials)
    assert done.returncode == 1  # every trial it ran failed (the line lost three times counts as failed)

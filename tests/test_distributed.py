"""Many processes on one study: `orch study create` / `worker` / `run` against PostgreSQL, a real
`mlflow server`, and the journal store; lost workers; passwords that never show."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from urllib.parse import quote

import mlflow
import optuna
import pytest

from helpers import FLAKY, FLAKY_SRC, check_agreement, echo_study, live_in_group, load, orch, runs_of, start, write

CONTINUOUS = {"module.lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True},
              "cell.forget_bias": {"type": "float", "low": 0.0, "high": 2.0}}
#: what must never appear in a log of a healthy study
LOG_ERRORS = ("Traceback", "IntegrityError", "UniqueViolation", "database is locked", "deadlock",
              "could not obtain lock", "LockError")


def pg_study(url: str, name: str):
    """The study, read through connections closed after each use (none kept open by a poll)."""
    from sqlalchemy.pool import NullPool

    return optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(url.replace(
        "postgresql://", "postgresql+psycopg://"), engine_kwargs={"poolclass": NullPool}))


def distinct(trials) -> int:
    return len({tuple(sorted(t.params.items())) for t in trials})


def no_errors(*texts):
    for text in texts:
        for bad in LOG_ERRORS:
            assert bad.lower() not in text.lower(), f"{bad!r} in:\n{text[-4000:]}"


@pytest.mark.slow
def test_four_workers_on_two_machines_share_a_postgres_study_through_an_mlflow_server(
        tmp_path, databases, mlflow_server):
    storage = databases.make()
    machine_a, machine_b = tmp_path / "a", tmp_path / "b"
    machine_a.mkdir()
    machine_b.mkdir()
    data = echo_study(trials=24, space=CONTINUOUS)
    data["name"] = "fleet"
    data["dataset"].update(length=1000, val_length=200)
    path = write(machine_a / "fleet.yaml", data)
    created = orch("study", "create", path, "--storage", storage, "--tracking-uri", mlflow_server, cwd=machine_a)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["budget"] == 24

    # two workers with the file on machine a, two on machine b with nothing but the study's name
    procs = [start("study", "worker", path, "--storage", storage, "--tracking-uri", mlflow_server,
                   cwd=machine_a, log=tmp_path / f"a{i}.log") for i in range(2)]
    procs += [start("study", "worker", "fleet", "--storage", storage, "--tracking-uri", mlflow_server,
                    cwd=machine_b, log=tmp_path / f"b{i}.log") for i in range(2)]
    codes = [p.wait(timeout=900) for p in procs]
    logs = [(tmp_path / f"{m}{i}.log").read_text() for m in "ab" for i in range(2)]
    assert codes == [0, 0, 0, 0], "\n\n".join(logs)
    no_errors(*logs)

    study = pg_study(storage, "fleet")
    assert len(study.trials) == 24 and all(t.state.name == "COMPLETE" for t in study.trials)  # budget exact
    assert distinct(study.trials) == 24
    client = mlflow.MlflowClient(mlflow_server)
    parents, children = runs_of(client, "fleet")  # one experiment
    by_trial = check_agreement(study, parents, children)  # one parent run, a child run per trial, same states
    assert parents[0].info.status == "FINISHED" and parents[0].data.metrics["trials_complete"] == 24
    assert len({r.data.tags["orch.stream"] for r in children}) >= 2  # each worker drew its own sampler stream
    assert len({r.data.tags["orch.worker"] for r in children}) >= 2
    # artifacts went through the server: config and checkpoint of a trial, plots of the study
    run = by_trial[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "checkpoints"}
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "plots")} >= {
        "plots/optimization_history.png", "plots/parallel_coordinate.png"}
    # nothing logged beside the workers (only their checkpoint store, emptied as trials ended)
    assert os.listdir(machine_b / "mlruns") == ["checkpoints"]
    assert [p for p in (machine_b / "mlruns").rglob("*") if p.is_file()] == []


@pytest.mark.slow
def test_a_lost_worker_s_trial_goes_stale_and_another_worker_retries_it(tmp_path, databases, fake_dist):
    root = fake_dist("flaky-module", FLAKY, {"flaky_module": FLAKY_SRC})
    env = {"PYTHONPATH": str(root)}
    storage = databases.make()
    release = tmp_path / "release"
    data = echo_study(trials=3, space=CONTINUOUS, heartbeat={"interval": 1, "grace_period": 3})
    data["module"] = {"plugin": "flaky", "lr": 0.01, "mode": "hang", "release": str(release)}
    data["trainer"]["max_epochs"] = 3
    path = write(tmp_path / "tiny.yaml", data)
    created = orch("study", "create", path, "--storage", storage, cwd=tmp_path, env=env)
    assert created.returncode == 0, created.stderr

    lost_node = start("study", "worker", "tiny", "--storage", storage, cwd=tmp_path, env=env,
                      log=tmp_path / "lost.log")
    deadline = time.time() + 120
    victim = None
    while victim is None and time.time() < deadline:
        time.sleep(0.5)
        running = pg_study(storage, "tiny").get_trials(states=(optuna.trial.TrialState.RUNNING,))
        victim = next((t for t in running if "orch.mlflow_run_id" in t.user_attrs), None)
    assert victim is not None, (tmp_path / "lost.log").read_text()
    time.sleep(2)  # training, with heartbeats
    os.killpg(lost_node.pid, signal.SIGKILL)  # the machine is gone: its `study worker` and the worker process
    lost_node.wait(timeout=30)
    assert live_in_group(lost_node.pid) == []  # nothing of it is left running
    release.touch()
    time.sleep(4)  # past the grace period: the heartbeat, not the dead pid of this host, tells it is lost

    survivor = orch("study", "worker", "tiny", "--storage", storage, cwd=tmp_path, env=env)
    assert survivor.returncode == 0, survivor.stderr
    no_errors(survivor.stderr)
    study = pg_study(storage, "tiny")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    by_trial = check_agreement(study, *runs_of(client, "tiny"))
    lost = study.trials[victim.number]
    assert lost.state.name == "FAIL" and lost.user_attrs["orch.lost"] is True
    assert "sent no heartbeat for over 3 s" in lost.user_attrs["orch.error"]
    assert by_trial[victim.number].info.status == "KILLED" and by_trial[victim.number].data.tags["orch.state"] == "lost"
    [retry] = [t for t in study.trials if t.user_attrs.get("orch.retry_of") == victim.number]
    # the lost trial as stored now (the snapshot above may predate its parameters)
    assert lost.params and retry.params == lost.params and retry.state.name == "COMPLETE"
    assert by_trial[retry.number].data.tags["orch.retry_of"] == str(victim.number)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3 and len(study.trials) == 4  # full budget


@pytest.mark.parametrize("store", ["journal", pytest.param("postgresql", marks=pytest.mark.slow),
                                   pytest.param("sqlite", marks=pytest.mark.slow)])
def test_two_runs_started_at_the_same_instant_on_a_fresh_store(tmp_path, request, store):
    data = echo_study(trials=6, space=CONTINUOUS)
    path = write(tmp_path / "tiny.yaml", data)
    args = ["study", "run", path, "--workers", "1"]
    if store == "postgresql":  # the study and the MLflow store both in fresh databases
        databases = request.getfixturevalue("databases")
        args += ["--storage", databases.make(), "--tracking-uri", databases.make()]
    elif store == "sqlite":
        args += ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]
    procs = [start(*args, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    no_errors(*(err for _, err in outs))
    if store == "journal":
        study, client, parents, children = load(tmp_path)
    elif store == "sqlite":
        study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
        parents, children = runs_of(client, "tiny")
    else:
        study = pg_study(args[args.index("--storage") + 1], "tiny")
        client = mlflow.MlflowClient(args[-1].replace("postgresql://", "postgresql+psycopg://"))
        parents, children = runs_of(client, "tiny")  # one experiment
    check_agreement(study, parents, children)  # one parent run
    assert len(study.trials) == 6 and all(t.state.name == "COMPLETE" for t in study.trials)  # exact budget
    assert distinct(study.trials) == 6
    assert {json.loads(out)["parent_run_id"] for out, _ in outs} == {parents[0].info.run_id}
    assert {r.data.tags["orch.stream"] for r in children} == {"0", "1"}  # a sampler stream per worker


PASSWORD = "p@ss:w/rd"


@pytest.mark.slow  # seven orch commands against PostgreSQL and an MLflow server: a minute
def test_a_password_with_at_colon_and_slash_never_shows(tmp_path, databases, mlflow_server):
    storage = databases.make(password=PASSWORD)
    host = mlflow_server.split("://", 1)[1]
    tracking = f"http://orch:{quote(PASSWORD, safe='')}@{host}"  # the server ignores the credentials
    forms = {PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD), "p@ss", "w/rd"}
    data = echo_study(trials=2, space=CONTINUOUS)
    data["name"] = "secret"
    data["study"]["storage"] = storage
    data["tracking_uri"] = tracking
    path = write(tmp_path / "secret.yaml", data)
    unreachable = storage.replace("127.0.0.1:5432", "127.0.0.1:1")
    outputs = [
        orch("study", "run", path, cwd=tmp_path),
        orch("study", "show", path, cwd=tmp_path),
        orch("study", "best", "secret", "--storage", storage, cwd=tmp_path),
        orch("study", "worker", "secret", "--storage", storage, cwd=tmp_path),  # the stored URI hides it
        orch("study", "worker", "nosuch", "--storage", storage, cwd=tmp_path),
        orch("study", "run", path, "--storage", unreachable, cwd=tmp_path),
        orch("study", "worker", "secret", "--storage", unreachable, cwd=tmp_path),
    ]
    assert [p.returncode for p in outputs] == [0, 0, 0, 2, 2, 2, 2], [p.stderr for p in outputs]
    assert "pass it with --tracking-uri" in outputs[3].stderr
    assert "no study 'nosuch'" in outputs[4].stderr
    assert "cannot open the Optuna storage postgresql+psycopg://postgres:***@127.0.0.1:1/" in outputs[5].stderr
    texts = [p.stdout + p.stderr for p in outputs]

    client = mlflow.MlflowClient(mlflow_server)
    parents, children = runs_of(client, "secret")
    for run in parents + children:
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        for artifact in client.list_artifacts(run.info.run_id):
            if artifact.path.endswith((".yaml", ".txt")):
                texts.append(Path(client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path))).read_text())
    study = pg_study(storage, "secret")
    texts.append(json.dumps(study.user_attrs))  # the study file and tracking URI stored with the study
    assert any("study.yaml" in str(client.list_artifacts(r.info.run_id)) for r in parents)
    assert "postgresql+psycopg://postgres:***@127.0.0.1:5432/" in parents[0].data.tags["orch.storage"]
    for text in texts:
        for form in forms:
            assert form not in text, (form, text[:2000])


def test_redaction_of_messages_for_passwords_of_any_characters():
    from orchestrator.secrets import redact, redact_data, redact_url

    for password in ["p@ss:w/rd", "a b%c", "ü?#&=[]", "x'y\"z", "@@@"]:
        encoded = quote(password, safe="")
        url = f"postgresql+psycopg://user:{encoded}@db.example:5432/optuna"
        shown = redact_url(url)
        assert shown == "postgresql+psycopg://user:***@db.example:5432/optuna"
        message = f"connection to {url} failed for user with password {password!r} ({encoded})"
        assert password not in redact(message) and encoded not in redact(message)
        assert redact_data({"study": {"storage": url, "n": [url]}}) == {"study": {"storage": shown, "n": [shown]}}
    # a URL never parsed before, even one whose password was not encoded
    assert redact("see http://me:un@coded:pw@host:5000/x") == "see http://me:***@host:5000/x"
    assert redact("sqlite:////tmp/a.db and http://127.0.0.1:5000") == "sqlite:////tmp/a.db and http://127.0.0.1:5000"


def test_each_worker_draws_its_own_sampler_stream_and_one_worker_keeps_the_seed(tmp_path):
    from orchestrator.spec.samplers import make_sampler
    from orchestrator.spec.space import suggest
    from orchestrator.spec.study import load_study

    study = load_study(write(tmp_path / "s.yaml", echo_study(space=CONTINUOUS)))

    def first_params(sampler):
        ostudy = optuna.create_study(direction="maximize", sampler=sampler)
        return [suggest(ostudy.ask(), study.section, study.data) for _ in range(3)]

    seeded = first_params(optuna.samplers.RandomSampler(seed=0))  # the file's seed, as Optuna draws it
    assert first_params(make_sampler(study.section, offset=0)) == seeded
    streams = [first_params(make_sampler(study.section, offset=k)) for k in range(4)]
    assert len({json.dumps(s) for s in streams}) == 4


def test_a_study_file_that_changed_is_refused_with_what_differs(tmp_path, monkeypatch):
    from orchestrator.errors import SpecError
    from orchestrator.execution.opening import open_study
    from orchestrator.spec.study import load_study
    from orchestrator.storage import record

    monkeypatch.chdir(tmp_path)
    data = echo_study(space=CONTINUOUS)
    url = f"journal:{tmp_path / 'tiny.journal'}"
    open_study(load_study(write(tmp_path / "tiny.yaml", data)), url, create=True, budget=4)
    # what may change between invocations: budget, timeout, resources
    data["study"].update(trials=8, timeout=60, resources={"workers": 2})
    joined = open_study(load_study(write(tmp_path / "tiny.yaml", data)), url, create=True, budget=8)
    assert record.budget(joined.ostudy) == 8
    data["study"]["space"]["module.lr"]["high"] = 0.1
    data["cell"]["hidden_size"] = 16
    data["study"]["heartbeat"] = {"interval": 5}  # every process must agree on when a trial is lost
    with pytest.raises(SpecError) as err:
        open_study(load_study(write(tmp_path / "tiny.yaml", data)), url, create=False)
    assert "cell.hidden_size, study.heartbeat.interval, study.space.module.lr.high differ" in str(err.value)
    assert str(err.value).startswith(f"{tmp_path / 'tiny.yaml'}:")
    assert record.stored_study(url, "tiny").data["cell"]["hidden_size"] == 8  # the stored study is untouched


@pytest.mark.slow
def test_a_journal_study_moves_to_postgres_and_goes_on_there(tmp_path, databases):
    data = echo_study(trials=2, space=CONTINUOUS)
    path = write(tmp_path / "tiny.yaml", data)
    assert orch("study", "run", path, cwd=tmp_path).returncode == 0
    journal, _, parents, _ = load(tmp_path)
    storage = databases.make()
    copied = orch("study", "copy", "tiny", "--from", f"journal:{tmp_path / 'mlruns' / 'optuna' / 'tiny.journal'}",
                  "--to", storage, cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr
    assert "copied study 'tiny' (2 trials)" in copied.stderr
    again = orch("study", "copy", "tiny", "--from", f"journal:{tmp_path / 'mlruns' / 'optuna' / 'tiny.journal'}",
                 "--to", storage, cwd=tmp_path)
    assert again.returncode == 2 and "already holds a study 'tiny'; pass --to-name" in again.stderr

    # a worker joins the copy by name and finds nothing to do; a larger budget goes on in PostgreSQL
    worker = orch("study", "worker", "tiny", "--storage", storage, cwd=tmp_path)
    assert worker.returncode == 0, worker.stderr
    run = orch("study", "run", path, "--storage", storage, "--trials", "3", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    study = pg_study(storage, "tiny")
    assert [t.params for t in study.trials[:2]] == [t.params for t in journal.trials]
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    parents_now, children = runs_of(client, "tiny")
    assert [p.info.run_id for p in parents_now] == [parents[0].info.run_id]  # the same parent run
    check_agreement(study, parents_now, children)


def test_a_journal_study_s_trials_left_running_by_a_reboot_are_lost_and_retried(tmp_path, monkeypatch):
    """A journal has no heartbeats: a trial whose owner ran on this host before a reboot (same host
    name, another boot) is lost; one owned by a live process, or by another host, is not."""
    import socket

    from orchestrator import schema
    from orchestrator.execution import claims
    from orchestrator.execution.opening import open_study
    from orchestrator.spec.study import load_study
    from orchestrator.storage import owners as worker_ids

    monkeypatch.chdir(tmp_path)
    url = f"journal:{tmp_path / 'tiny.journal'}"
    joined = open_study(load_study(write(tmp_path / "tiny.yaml", echo_study(space=CONTINUOUS))), url,
                               create=True, budget=4)
    ostudy, owners = joined.ostudy, {}
    for owner in (f"{socket.gethostname()}~0ld0ne:4242", worker_ids.worker_id(), "elsewhere~abc123:4242"):
        trial = ostudy.ask()
        trial.suggest_float("module.lr", 0.001, 0.05, log=True)
        trial.set_user_attr(schema.WORKER, owner)
        owners[trial.number] = owner
    ostudy.ask()  # a worker died between asking for a trial and recording itself as its owner
    with claims.claim_lock(url, "tiny"):
        lost, retried, trials = claims.reap(ostudy)
    assert [e.number for e in lost] == [0, 3] and retried == [0]  # nothing to repeat of the ownerless one
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs["orch.lost"] is True
    # it never trained: interrupted, which costs no try of a line's three
    assert trials[3].user_attrs["orch.error"] == "interrupted: its worker stopped while claiming it"
    assert trials[3].user_attrs["orch.interrupted"] is True and "orch.lost" not in trials[3].user_attrs
    assert [t.state.name for t in trials[1:3]] == ["RUNNING", "RUNNING"]
    assert trials[4].state.name == "WAITING" and claims.counted(trials) == 2  # lost ones and the retry: no budget
    retry = ostudy.ask()  # the next claim gets the retry, with the lost trial's parameters
    assert retry.number == 4
    assert retry.suggest_float("module.lr", 0.001, 0.05, log=True) == trials[0].params["module.lr"]


def test_a_study_with_running_trials_is_not_copied_and_create_needs_a_budget(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from orchestrator.cli import main
    from orchestrator.errors import UsageError
    from orchestrator.execution.opening import open_study
    from orchestrator.spec.study import load_study
    from orchestrator.storage import record

    monkeypatch.chdir(tmp_path)
    data = echo_study(space=CONTINUOUS)
    url = f"journal:{tmp_path / 'tiny.journal'}"
    open_study(load_study(write(tmp_path / "tiny.yaml", data)), url, create=True, budget=4).ostudy.ask()
    with pytest.raises(UsageError, match=r"has running trials \[0\]: stop its workers first"):
        record.copy_study("tiny", url, f"journal:{tmp_path / 'copy.journal'}")
    data["study"]["trials"] = None
    result = CliRunner().invoke(main, ["study", "create", write(tmp_path / "open.yaml", data)])
    assert result.exit_code == 2 and "no budget: set study.trials or pass --trials" in result.stderr
    missing = CliRunner().invoke(main, ["study", "worker", "tiny", "--storage", f"journal:{tmp_path / 'nope.journal'}"])
    assert missing.exit_code == 2 and "nope.journal does not exist" in missing.stderr
    assert not (tmp_path / "nope.journal").exists()

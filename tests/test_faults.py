"""Faults, injected for real: signals to coordinator and worker processes, kill -9, journals cut or
damaged at real offsets, a full and a read-only filesystem, bad values; what is left afterwards in
Optuna, MLflow, on disk and in the process table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.cli import main

from helpers import (
    FLAKY,
    FLAKY_SRC,
    REQUIRE_SERVICES,
    check_agreement,
    echo_study,
    free_port,
    journal,
    live_in_group,
    load,
    orch,
    start,
    write,
)

TERM, INT = 128 + signal.SIGTERM, 128 + signal.SIGINT


def hang_study(tmp_path, *, epochs=4, trials=1, **study):
    """A study of ``trials`` grid points (learning rates) whose trials hang 0.2 s a training step
    (20 steps an epoch) until the file ``release`` exists; returns the file's path."""
    data = echo_study(trials=trials, sampler={"type": "grid"},
                      space={"module.lr": {"type": "categorical", "choices": [0.01, 0.02, 0.03][:trials]}}, **study)
    data["module"] = {"plugin": "flaky", "lr": 0.01, "mode": "hang", "release": str(tmp_path / "release")}
    data["trainer"]["max_epochs"] = epochs
    return write(tmp_path / "tiny.yaml", data)


def wait_for(predicate, what: str, timeout: float = 120, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint_epoch(tmp_path, lineage=0, name="tiny"):
    """The epoch of the last checkpoint published for a trial lineage (``None``: none yet)."""
    path = tmp_path / "mlruns" / "checkpoints" / name / f"trial-{lineage}" / "last.json"
    try:
        return json.loads(path.read_text())["epoch"]
    except (OSError, ValueError):  # not written yet
        return None


def running_worker(tmp_path, name="tiny") -> int | None:
    """The pid of the worker running a trial (once its MLflow run exists)."""
    if not journal(tmp_path, name).exists():
        return None
    study = optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal(tmp_path, name)))))
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if "orch.mlflow_run_id" in t.user_attrs:
            return int(t.user_attrs["orch.worker"].rsplit(":", 1)[1])
    return None


def history(client, run, key="val_acc"):
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


@pytest.fixture
def flaky(fake_dist):
    return {"PYTHONPATH": str(fake_dist("flaky-module", FLAKY, {"flaky_module": FLAKY_SRC}))}


# ---- preemption and resume -------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_to_a_worker_interrupts_its_trial_and_the_retry_resumes_to_the_uninterrupted_result(tmp_path, flaky):
    path = hang_study(tmp_path)
    (tmp_path / "release").touch()  # the reference: the same trial, never interrupted
    ref = orch("study", "run", path, "--set", "study.name=ref", cwd=tmp_path, env=flaky)
    assert ref.returncode == 0, ref.stderr
    _, client, _, [ref_run] = load(tmp_path, "ref")
    (tmp_path / "release").unlink()

    proc = start("study", "run", path, cwd=tmp_path, env=flaky)
    # the checkpoint of epoch 2 is published when the last epoch (3) starts: stop the trial in it
    wait_for(lambda: (checkpoint_epoch(tmp_path) or 0) >= 2, "the last epoch", proc=proc)
    os.kill(running_worker(tmp_path), signal.SIGTERM)  # what a scheduler sends to the trial's process
    (tmp_path / "release").touch()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"exited with code {TERM} (stopped by a signal" in err and "restarting it" in err
    study, client, parents, children = load(tmp_path)
    by_trial = check_agreement(study, parents, children)
    stopped, retry = study.trials
    assert stopped.state.name == "FAIL" and stopped.user_attrs["orch.interrupted"] is True
    assert "SIGTERM" in stopped.user_attrs["orch.error"]
    assert by_trial[0].data.tags["orch.state"] == "interrupted" and by_trial[0].info.status == "KILLED"
    assert retry.state.name == "COMPLETE" and retry.user_attrs["orch.retry_of"] == 0
    assert json.loads(out)["complete"] == 1
    # it went on from its last checkpoint: every epoch once in its run, the same numbers as without the stop
    assert by_trial[1].data.tags["orch.resumed_at_epoch"] == "3"  # only the last epoch trained again
    assert [s for s, _ in history(client, by_trial[1])] == [0, 1, 2, 3]
    assert sorted(retry.intermediate_values) == [0, 1, 2, 3]
    for (step, value), (ref_step, ref_value) in zip(history(client, by_trial[1]), history(client, ref_run)):
        assert step == ref_step and value == pytest.approx(ref_value, abs=1e-6)
    assert retry.value == pytest.approx(ref_run.data.metrics["val_acc"], abs=1e-6)
    assert not (tmp_path / "mlruns" / "checkpoints" / "tiny" / "trial-0").exists()  # done: nothing to resume


def _ready_workers(pid: int) -> list[int]:
    """The worker processes (multiprocessing spawn) of process ``pid`` that catch SIGTERM: their
    stop handlers are in place (Python itself catches only SIGINT)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            caught = next(int(line.split()[1], 16) for line in Path(f"/proc/{entry}/status").read_text().splitlines()
                          if line.startswith("SigCgt:"))
        except (OSError, IndexError, StopIteration):
            continue
        if (int(stat[1]) == pid and stat[0] not in ("Z", "X") and b"spawn_main" in cmdline
                and caught & (1 << (signal.SIGTERM - 1))):
            found.append(int(entry))
    return found


def test_ctrl_c_while_the_study_opens_stops_the_workers_started_early(tmp_path):
    """The workers start, and import torch, Lightning and MLflow, while the coordinator still
    opens the study: a Ctrl-C then stops them all, cleanly, with the coordinator."""
    path = write(tmp_path / "tiny.yaml", echo_study(trials=2, space={"module.lr": {"type": "float", "low": 0.001,
                                                                                    "high": 0.01}}))
    proc = start("study", "run", path, "--workers", "2", cwd=tmp_path)
    early = wait_for(lambda: len(_ready_workers(proc.pid)) >= 2 and _ready_workers(proc.pid),
                     "the workers started early", timeout=60, proc=proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole process group, the starting workers too
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    # reaped by the coordinator before it exited, not left to end on their own
    assert not [p for p in early if Path(f"/proc/{p}").exists()]
    assert live_in_group(proc.pid) == []  # (multiprocessing's resource tracker takes a moment to go)
    if journal(tmp_path).exists():  # the study had been created: nothing is left running in it
        study = optuna.load_study(study_name="tiny", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(journal(tmp_path)))))
        assert not [t for t in study.trials if t.state.name == "RUNNING"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_study_run_stops_every_process_and_the_next_run_resumes(tmp_path, flaky, signum):
    path = hang_study(tmp_path)
    proc = start("study", "run", path, cwd=tmp_path, env=flaky)
    wait_for(lambda: (checkpoint_epoch(tmp_path) or 0) >= 1, "the end of epoch 1", proc=proc)
    worker = running_worker(tmp_path)
    t = time.time()
    os.kill(proc.pid, signum)  # the coordinator alone: it stops its workers itself
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert time.time() - t < 30
    assert live_in_group(proc.pid) == [] and not Path(f"/proc/{worker}").exists()  # no process left
    study, client, parents, children = load(tmp_path)
    by_trial = check_agreement(study, parents, children)
    [stopped] = study.trials
    assert stopped.state.name == "FAIL" and stopped.user_attrs["orch.interrupted"] is True
    assert by_trial[0].info.status == "KILLED" and parents[0].info.status == "KILLED"
    assert checkpoint_epoch(tmp_path) >= 1  # kept for the retry

    (tmp_path / "release").touch()
    again = orch("study", "run", path, cwd=tmp_path, env=flaky)
    assert again.returncode == 0, again.stderr
    study, client, parents, children = load(tmp_path)
    by_trial = check_agreement(study, parents, children)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]  # the budget of 1: the retry
    assert int(by_trial[1].data.tags["orch.resumed_at_epoch"]) >= 2
    assert [s for s, _ in history(client, by_trial[1])] == [0, 1, 2, 3]
    assert parents[0].info.status == "FINISHED"


@pytest.mark.slow
def test_kill_9_of_the_coordinator_stops_its_workers_and_the_next_run_repairs_the_study(tmp_path, flaky):
    path = hang_study(tmp_path, trials=2)
    proc = start("study", "run", path, cwd=tmp_path, env=flaky)
    worker = wait_for(lambda: running_worker(tmp_path), "a running trial", proc=proc)
    time.sleep(1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    t = time.time()
    wait_for(lambda: not Path(f"/proc/{worker}").exists() or "zombie" in Path(f"/proc/{worker}/status").read_text(),
             "the orphaned worker to stop", timeout=30)
    assert time.time() - t < 15  # within seconds, not after the rest of the budget
    study, client, parents, children = load(tmp_path)
    assert [t.state.name for t in study.trials] == ["FAIL"] and study.trials[0].user_attrs["orch.interrupted"]
    assert parents[0].info.status == "RUNNING"  # its coordinator died before closing it

    (tmp_path / "release").touch()
    again = orch("study", "run", path, cwd=tmp_path, env=flaky)
    assert again.returncode == 0, again.stderr
    study, client, parents, children = load(tmp_path)
    check_agreement(study, parents, children)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 2
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["best_val_acc"] == pytest.approx(study.best_value)  # from the storage


@pytest.mark.slow
def test_a_run_in_which_every_trial_failed_exits_1_with_a_summary(tmp_path, flaky):
    data = echo_study(trials=2, space={"module.lr": {"type": "float", "low": 0.001, "high": 0.01}})
    data["module"] = {"plugin": "flaky", "lr": 0.01, "mode": "raise"}
    proc = orch("study", "run", write(tmp_path / "tiny.yaml", data), cwd=tmp_path, env=flaky)
    assert proc.returncode == 1, proc.stderr
    assert "every trial of this run failed (2): 2 x RuntimeError" in proc.stderr
    assert json.loads(proc.stdout)["failed"] == 2


# ---- damaged journals -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_journal(tmp_path_factory):
    """The journal of a finished 3-trial study, and the byte offset at which each trial's record
    of completion ends."""
    root = tmp_path_factory.mktemp("journal")
    proc = orch("study", "run", write(root / "tiny.yaml", echo_study(trials=3, space={
        "module.lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True}})), cwd=root)
    assert proc.returncode == 0, proc.stderr
    data = journal(root).read_bytes()
    ends, offset = {}, 0
    for line in data.splitlines(keepends=True):
        offset += len(line)
        record = json.loads(line)
        if record["op_code"] == 6 and record.get("state") == 1:  # SET_TRIAL_STATE_VALUES: COMPLETE
            ends[record["trial_id"]] = offset  # one study: trial id == trial number
    return data, ends


def show(tmp_path, path):
    result = CliRunner().invoke(main, ["study", "show", "tiny", "--json", "--storage", f"journal:{path}"])
    return result


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0, 1))
def test_a_journal_cut_anywhere_loses_no_complete_trial_before_the_cut(tmp_path, finished_journal, cut):
    from orchestrator.storage.backends import open_storage

    data, ends = finished_journal
    offset = int(cut * len(data))
    path = tmp_path / f"cut-{offset}.journal"
    path.write_bytes(data[:offset])
    result = show(tmp_path, path)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.output
    assert path.read_bytes() == data[:offset]  # a command that reads writes nothing
    if result.exit_code == 2:  # cut before the study was even created
        assert "no study 'tiny'" in result.stderr and not any(end <= offset for end in ends.values())
        return
    assert result.exit_code == 0, result.output
    expected = {number for number, end in ends.items() if end <= offset}
    assert {row["number"] for row in json.loads(result.stdout) if row["state"] == "complete"} >= expected
    # a writer next: the torn tail is mended first, so its record is never glued onto the fragment
    optuna.load_study(study_name="tiny", storage=open_storage(f"journal:{path}")).set_user_attr("after", offset)
    assert path.read_bytes().endswith(b"\n") and path.read_bytes().startswith(data[:offset].rsplit(b"\n", 1)[0])
    again = show(tmp_path, path)
    assert again.exit_code == 0, again.output
    assert {row["number"] for row in json.loads(again.stdout) if row["state"] == "complete"} >= expected
    assert optuna.load_study(study_name="tiny", storage=open_storage(f"journal:{path}")).user_attrs["after"] == offset


def test_a_damaged_journal_is_refused_untouched_and_repair_recovers_every_valid_record(tmp_path, finished_journal):
    data, ends = finished_journal
    lines = data.splitlines(keepends=True)
    damaged = b"".join(lines[:5] + [b"\x00\x17garbage from a bad disk\n"] + lines[5:])
    path = tmp_path / "mlruns" / "optuna" / "tiny.journal"
    path.parent.mkdir(parents=True)
    path.write_bytes(damaged)
    offset = len(b"".join(lines[:5]))
    shown = show(tmp_path, path)
    assert shown.exit_code == 2
    assert f"{path}: the journal is damaged at line 6 (byte {offset})" in shown.stderr
    assert "orch study repair" in shown.stderr and len(shown.stderr.strip().splitlines()) == 1
    study_file = write(tmp_path / "tiny.yaml", echo_study(trials=5, space={
        "module.lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True}}))
    ran = orch("study", "run", study_file, cwd=tmp_path)
    assert ran.returncode == 2 and "damaged at line 6" in ran.stderr
    assert path.read_bytes() == damaged  # nothing appended after the damage

    repaired = CliRunner().invoke(main, ["study", "repair", "--storage", f"journal:{path}", "tiny"])
    assert repaired.exit_code == 0, repaired.output
    report = json.loads(repaired.stdout)
    assert report["dropped_lines"] == [6] and report["kept"] == len(lines)
    assert Path(report["backup"]).read_bytes() == damaged and path.read_bytes() == data
    rows = json.loads(show(tmp_path, path).stdout)
    assert sorted(r["number"] for r in rows if r["state"] == "complete") == sorted(ends)

    database = tmp_path / "optuna.db"  # an unreadable database: one message too
    database.write_bytes(b"this is not a SQLite database" * 100)
    broken = CliRunner().invoke(main, ["study", "show", "tiny", "--storage", f"sqlite:///{database}"])
    assert broken.exit_code == 2 and "cannot open the Optuna storage" in broken.stderr
    assert "file is not a database" in broken.stderr and broken.stderr.count("\n") == 1


# ---- resources that retrying cannot fix -------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 48 MiB filesystem (tmpfs), or a skip where this user cannot mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        if REQUIRE_SERVICES and os.geteuid() == 0:
            pytest.fail(f"cannot mount a tmpfs as root: {done.stderr}")
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while f.write(b"\0" * size):
                    pass
            except OSError:
                pass
    return filler


@pytest.mark.slow
def test_a_disk_that_fills_up_mid_study_stops_it_with_one_message_and_burns_no_trial(small_disk, flaky):
    cwd = small_disk
    path = hang_study(cwd, trials=3, epochs=3)
    proc = start("study", "run", path, "--workers", "1", cwd=cwd, env=flaky)
    wait_for(lambda: running_worker(cwd), "a running trial", proc=proc)
    filler = fill(cwd)
    (cwd / "release").touch()  # an empty file takes an inode, not a block: the trial goes on, and writes
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "no space left on the device" in err or "disk full" in err, err
    assert "restarting it" not in err and "Traceback" not in err
    assert err.count("error:") == 1
    assert live_in_group(proc.pid) == []

    filler.unlink()  # space again: the same command repairs the bookkeeping and goes on
    again = orch("study", "run", path, "--workers", "1", cwd=cwd, env=flaky)
    assert again.returncode == 0, again.stderr
    study, client, parents, children = load(cwd)
    check_agreement(study, parents, children)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3
    assert not any(t.state.name == "FAIL"
                   and not (t.user_attrs.get("orch.interrupted") or t.user_attrs.get("orch.lost"))
                   for t in study.trials)  # no trial was charged for the full disk


def test_unwritable_stores_and_an_unreachable_tracking_server_are_refused_before_any_trial(tmp_path, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    path = write(tmp_path / "tiny.yaml", echo_study(space={"module.lr": {"type": "float", "low": 0.001, "high": 0.01}}))
    cases = {
        "checkpoints": (["--set", f"study.checkpoint_dir={small_disk}/ckpt"], "cannot write to the checkpoint store"),
        "storage": (["--storage", f"journal:{small_disk}/optuna/tiny.journal"], "Read-only file system"),
        "tracking": (["--tracking-uri", f"sqlite:///{small_disk}/mlflow.db"], "Read-only file system"),
        "server": (["--tracking-uri", f"http://127.0.0.1:{free_port()}"], "cannot reach the MLflow tracking server"),
    }
    for case, (args, message) in cases.items():
        t = time.time()
        proc = orch("study", "run", path, *args, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, (case, proc.stderr)
        assert time.time() - t < 30 and "Traceback" not in proc.stderr, case
        assert len(proc.stderr.strip().splitlines()) <= 2, (case, proc.stderr)
    # the workers started while the study was being opened went with it: none is left behind
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "study", "run", path, *cases["server"][0]],
                            cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=60) == 2
    assert live_in_group(proc.pid, wait=5) == []  # gone within seconds of its exit
    # nothing ran: no trial in any store orch could write
    for store in (tmp_path / "mlruns" / "optuna").glob("*.journal"):
        study = optuna.load_study(study_name="tiny", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(store))))
        assert study.trials == []


# ---- every value checked before anything runs --------------------------------------------------------
BAD_VALUES = [
    (["--set", "trainer.max_epochs=abc"], "(--set trainer.max_epochs): trainer.max_epochs = 'abc' is not a valid int"),
    (["--set", "trainer.max_epochs=-1"], "trainer.max_epochs = -1 is not valid: it must be >= 1"),
    (["--set", "trainer.max_epochs=0"], "trainer.max_epochs = 0 is not valid: it must be >= 1"),
    (["--set", "cell.num_layers=0"], "cell.num_layers = 0 is not valid: it must be greater than or equal to 1"),
    (["--set", "cell.dropout=1.0"], "cell.dropout = 1.0 is not valid: it must be less than 1"),
    (["--set", "module.optimizer=rmsprop"], "module.optimizer = 'rmsprop' is not valid: it must be 'sgd' or 'adam'"),
    (["--set", "dataset.batch_size=0"], "dataset.batch_size = 0 is not valid"),
    pytest.param(["--set", "trainer.accelerator=gpu"], "this machine has no GPU that PyTorch can use",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    (["--set", "module.lr=0.1"], "module.lr is searched by study.space"),
    (["--set", "study.space.module.lr.low=-1"], "a log range needs low > 0"),
    (["--set", "study.space.cell.hidden_size.low=0"], "cell.hidden_size = 0 is not valid"),
    (["--set", "study.checkpoint_dir=memory://ckpt"], "memory:// is not a checkpoint store orch writes to"),
    (["--set", "study.checkpoint_dir=file:///tmp/ckpt"], "a file:// URL is a local folder"),
    (["--set", "study.checkpoint_dir=sftp://host/ckpt"], "sftp:// is not a checkpoint store orch writes to"),
    (["--set", "study.checkpoint_dir=S3://bucket/ckpt"], "a lower-case PROTOCOL://bucket/prefix"),
    (["--set", "study.checkpoint_dir=s3://me:secret@bucket/ckpt"], "names no user or password"),
    (["--set", "study.checkpoint_dir=s3://bucket/team*"], "no space, glob character"),
    (["--set", "study.checkpoint_dir=s3://bucket/ckpt?versionId=1"], "has no query or fragment"),
    (["--set", "study.checkpoint_dir=s3://bucket/../other"], "has no '.' or '..' component"),
    (["--set", "study.checkpoint_dir=simplecache::s3://bucket/x"], "a chain of filesystems (::) is not"),
    (["--set", "study.checkpoint_dir=s3://"], "s3:// names no bucket"),
]


@pytest.mark.parametrize("args,message", BAD_VALUES,
                         ids=[(b.values if hasattr(b, "values") else b)[0][1] for b in BAD_VALUES])
def test_every_value_is_checked_before_anything_runs(tmp_path, monkeypatch, args, message):
    data = echo_study(space={"module.lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True},
                             "cell.hidden_size": {"type": "int", "low": 4, "high": 8}})
    path = write(tmp_path / "tiny.yaml", data)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["study", "run", path, *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.startswith(f"error: {path}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mlruns").exists()


def test_a_binary_file_is_one_clear_message(tmp_path, monkeypatch):
    path = tmp_path / "model.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    monkeypatch.chdir(tmp_path)
    for args in (["study", "run", str(path)], ["train", str(path)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "not a text file" in result.stderr, result.output


def test_ui_refuses_a_taken_or_an_invalid_port(tmp_path, monkeypatch):
    import socket

    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = CliRunner().invoke(main, ["ui", "--port", str(port)])
        assert busy.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in busy.stderr
    invalid = CliRunner().invoke(main, ["ui", "--port", "70000"])
    assert invalid.exit_code == 2 and "70000 is not in the range" in invalid.output

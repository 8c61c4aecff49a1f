"""Checkpoints in object storage (``study.checkpoint_dir: s3://bucket/prefix``): a trial stopped in
the middle of an epoch resumes from the bucket, exactly, wherever its retry runs; the store is
probed before any trial, sized and collected. The S3 server is a real one in a process of the
test session's own (moto's), reached over HTTP through s3fs as a user's machines reach theirs."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import yaml
from test_preemption import Recorder, SigtermAt, small_run

from orchestrator.execution import stopping
from orchestrator.execution.checkpoint_lines import Store
from orchestrator.training.callbacks import interruption
from orchestrator.training.checkpoints import LastCheckpoint
from orchestrator.training.fit import fit
from orchestrator.training.stores import FsspecLine

from helpers import check_agreement, echo_study, free_port, load, orch, runs_of, start, write


def _objects(fs, path: str) -> list[str]:
    try:
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, refresh=True))
    except FileNotFoundError:
        return []


def test_a_trial_stopped_mid_epoch_resumes_exactly_from_the_bucket_and_its_line_is_collected(
        tmp_path, s3_bucket, stop_handler):
    import s3fs

    spec = small_run("sum_game", tmp_path)
    ref = Recorder()
    fit(spec, callbacks=[ref], enable_progress_bar=False)
    per_epoch = len(ref.losses) // 2
    stop_at = per_epoch + 23  # in the second epoch, after two interval checkpoints of it

    line, first = FsspecLine(s3_bucket, "tiny", 0), Recorder()
    with pytest.raises(stopping.TrialInterrupted):
        fit(spec, callbacks=[LastCheckpoint(line, "k", every_windows=10), first, SigtermAt(stop_at), interruption()],
            enable_progress_bar=False)
    assert line.wait() is None  # every upload went through
    assert len(line.uploads) >= 1 and len(first.losses) == stop_at
    # the bucket holds the checkpoint taken at the signal and its index, nothing else: the
    # earlier ones were replaced, no index was left half-moved
    fs = s3fs.S3FileSystem()
    held = _objects(fs, line.path)
    assert len(held) == 2 and held[1] == "last.json", held
    assert re.fullmatch(rf"last-1-{stop_at - per_epoch}-[0-9a-f]{{16}}\.ckpt", held[0]), held
    index = json.loads(fs.cat_file(f"{line.path}/last.json"))
    assert index == {"epoch": 0, "window": stop_at - per_epoch, "key": "k", "file": held[0]}
    line.release()
    stopping._stop = None

    # the retry: a new process's view of the bucket (nothing cached), on a "machine" with no file of the first
    s3fs.S3FileSystem.clear_instance_cache()
    retry = FsspecLine(s3_bucket, "tiny", 0)
    assert retry.fetch("another study's key") is None
    path, epoch, window = retry.fetch("k")
    assert (epoch, window) == (1, stop_at - per_epoch) and path.parent == retry.tmp_dir()
    second = Recorder()
    fit(spec, callbacks=[LastCheckpoint(retry, "k"), second], resume=path, enable_progress_bar=False)
    assert retry.wait() is None
    retry.release()
    assert not path.exists()  # the downloaded copy is removed
    assert first.losses + second.losses == pytest.approx(ref.losses, abs=1e-6)
    got = first.val + second.val
    assert len(got) == 2 and all(g == pytest.approx(r, abs=1e-6) for g, r in zip(got, ref.val))

    # sized and collected like a folder store (no trial left: the line ended)
    store = Store(s3_bucket, "tiny")
    size = fs.size(f"{line.path}/{held[0]}") + fs.size(f"{line.path}/last.json")
    assert store.where() == f"{s3_bucket}/tiny"
    assert store.lines() == {0: size}
    assert store.collect(lambda: []) == {0: size}
    assert store.lines() == {} and _objects(fs, line.path) == []


def test_an_unreachable_bucket_or_a_missing_backend_stops_the_study_before_any_trial(tmp_path, s3_bucket):
    data = echo_study(trials=1)
    for url, message in ((s3_bucket.replace("s3://orch-", "s3://missing-"), "The specified bucket does not exist"),
                         ("gs://bucket/ckpt", "needs gcsfs on every machine of the study: pip install gcsfs")):
        data["study"]["checkpoint_dir"] = url
        path = write(tmp_path / "tiny.yaml", data)
        result = orch("study", "run", path, cwd=tmp_path, timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert url.split("/")[2] in result.stderr
    journals = list((tmp_path / "mlruns" / "optuna").glob("*.journal")) if (tmp_path / "mlruns").exists() else []
    assert journals == []  # nothing ran, no study was made


def test_a_store_that_does_not_answer_at_resume_is_not_taken_for_an_empty_line(s3_bucket, monkeypatch):
    """Unavailable (which ends the retry interrupted, to run again: trial._end), never "no checkpoint"
    (which would start it over and replace the line's checkpoint)."""
    import s3fs

    from orchestrator import outages

    line = FsspecLine(s3_bucket, "tiny", 0)
    assert line.fetch("k") is None  # nothing there: "not found" is the only error that means no checkpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # the store is away
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(outages.Unavailable, match=f"the checkpoint store {s3_bucket} does not answer"):
        FsspecLine(s3_bucket, "tiny", 0).fetch("k")


@pytest.mark.slow
def test_a_study_worker_sigtermed_on_one_machine_resumes_on_another_from_the_bucket(
        tmp_path, databases, mlflow_server, s3_bucket):
    """Two "machines" (working folders) that share nothing but the study's PostgreSQL database, its
    tracking server and a bucket."""
    import mlflow
    import optuna
    import s3fs
    from test_faults import history, wait_for
    from test_preemption import _preempt_study

    storage = databases.make()
    machine_a, machine_b, ref_dir = tmp_path / "a", tmp_path / "b", tmp_path / "ref"
    for folder in (machine_a, machine_b, ref_dir):
        folder.mkdir()
    data = yaml.safe_load(open(_preempt_study(tmp_path)).read())
    data["name"] = name = "bucket"
    data["study"].update(checkpoint_dir=s3_bucket, heartbeat={"interval": 1, "grace_period": 3})
    path = write(machine_a / "study.yaml", data)
    ref = orch("study", "run", path, "--set", "study.checkpoint_dir=ckpt", cwd=ref_dir)  # never stopped
    assert ref.returncode == 0, ref.stderr
    _, ref_client, _, [ref_run] = load(ref_dir, name)

    created = orch("study", "create", path, "--storage", storage, "--tracking-uri", mlflow_server, cwd=machine_a)
    assert created.returncode == 0, created.stderr
    fs = s3fs.S3FileSystem()
    index_path = f"{s3_bucket.removeprefix('s3://')}/{name}/trial-0/last.json"

    def published():
        try:
            return json.loads(fs.cat_file(index_path))
        except (OSError, ValueError):
            return None

    node_a = start("study", "worker", path, "--storage", storage, "--tracking-uri", mlflow_server, cwd=machine_a,
                   log=tmp_path / "a.log")
    before = wait_for(lambda: (published() or {}).get("window") and published(), "a window checkpoint in the bucket",
                      proc=node_a)
    os.killpg(node_a.pid, signal.SIGTERM)  # the machine is preempted: a grace period, then gone
    node_a.wait(timeout=120)
    log_a = (tmp_path / "a.log").read_text()
    assert node_a.returncode == 128 + signal.SIGTERM, log_a
    node_b = orch("study", "worker", name, "--storage", storage, "--tracking-uri", mlflow_server, cwd=machine_b)
    assert node_b.returncode == 0, node_b.stderr + log_a

    study = optuna.load_study(study_name=name, storage=storage.replace("postgresql://", "postgresql+psycopg://"))
    client = mlflow.MlflowClient(mlflow_server)
    parents, children = runs_of(client, name)
    by_trial = check_agreement(study, parents, children)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]  # the budget (1) exact
    tags = by_trial[1].data.tags
    point = (int(tags["orch.resumed_at_epoch"]), int(tags["orch.resumed_at_window"]))
    assert point > (before["epoch"] + 1, before["window"])  # the checkpoint written at the signal
    for key in ("val_acc", "val_loss", "train_loss"):  # every epoch once, as in the run never stopped
        got, want = history(client, by_trial[1], key), history(ref_client, ref_run, key)
        assert [s for s, _ in got] == [s for s, _ in want] == [0, 1]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6)
    assert published() is None and _objects(fs, f"{s3_bucket.removeprefix('s3://')}/{name}") == []  # collected
    assert list(machine_b.rglob("*.ckpt")) == []

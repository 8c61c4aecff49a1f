"""Preemption in the middle of an epoch: a trial stopped by SIGTERM (or killed) between two
training windows continues at the next window and trains exactly as if it had never stopped."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from test_faults import history, running_worker, wait_for

from orchestrator.execution import stopping
from orchestrator.spec.run import load_spec
from orchestrator.training.callbacks import interruption
from orchestrator.training.checkpoints import LAST, LastCheckpoint
from orchestrator.training.fit import fit

from helpers import check_agreement, echo_study, load, orch, runs_of, shared_ptb_dir, start, write

STUDIES = Path(__file__).resolve().parents[1] / "studies"


class Recorder(pl.Callback):
    """Every training window's loss, and every validation's metrics."""

    def __init__(self):
        self.losses: list[float] = []
        self.val: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_validation_end(self, trainer, module):
        self.val.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")})


class SigtermAt(pl.Callback):
    """Sends this process a real SIGTERM in the middle of training window ``n`` (counted over the fit)."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def on_before_backward(self, trainer, module, loss):
        self.seen += 1
        if self.seen == self.n:
            os.kill(os.getpid(), signal.SIGTERM)


def small_run(name: str, tmp: Path):
    """The study file's run at small settings: 2 epochs, a few hundred windows."""
    data = yaml.safe_load((STUDIES / f"{name}.yaml").read_text())
    data.pop("study")
    data["trainer"].update(max_epochs=2, accelerator="cpu")
    if name == "ptb_small":  # dropout on, so that the random generators matter
        data["trainer"].update(limit_train_batches=150, limit_val_batches=20)
        data["cell"]["dropout"] = data["module"]["dropout"] = 0.3
        folder = shared_ptb_dir()
        if folder is None:
            pytest.skip("the Penn Treebank files are not here (set ORCH_DATA_DIR to a folder with ptb/)")
        data["dataset"]["data_dir"] = str(folder)
    if name == "echo":
        data["dataset"].update(length=6000, val_length=1500)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_spec(path)[0]


@pytest.mark.parametrize("name, stop_at", [("sum_game", 37), ("sum_game", 170), ("echo", 30),
                                           pytest.param("ptb_small", 200, marks=pytest.mark.slow)])  # 34 s
def test_sigterm_mid_epoch_then_resume_trains_exactly_like_the_uninterrupted_run(name, stop_at, stop_handler):
    tmp = Path(tempfile.mkdtemp(prefix="orch-exact-"))
    spec = small_run(name, tmp)
    ref = Recorder()
    fit(spec, callbacks=[ref], enable_progress_bar=False)
    per_epoch = len(ref.losses) // 2
    assert 0 < stop_at % per_epoch < per_epoch - 1, (stop_at, per_epoch)  # inside an epoch

    first, store = Recorder(), tmp / "store"
    with pytest.raises(stopping.TrialInterrupted):
        fit(spec, callbacks=[LastCheckpoint(store, "k", every_windows=10**6), first, SigtermAt(stop_at),
                             interruption()], enable_progress_bar=False)
    index = json.loads((store / "last.json").read_text())  # written at the signal, at the next window
    assert index == {"epoch": stop_at // per_epoch - 1, "window": stop_at % per_epoch, "key": "k"}
    assert len(first.losses) == stop_at
    stopping._stop = None

    second = Recorder()
    fit(spec, callbacks=[LastCheckpoint(store, "k"), second], resume=store / LAST, enable_progress_bar=False)
    assert len(first.losses) + len(second.losses) == len(ref.losses)
    assert first.losses + second.losses == pytest.approx(ref.losses, abs=1e-6)
    got = first.val + second.val
    assert len(got) == 2 and all(g == pytest.approx(r, abs=1e-6) for g, r in zip(got, ref.val))


class SigtermAfterStepCallbacks(pl.Callback):
    """Sends this process a real SIGTERM at the end of window ``n``, after the other callbacks'
    ``on_train_batch_end`` (where Lightning's handler would end the fit before the next window)."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def on_train_batch_end(self, *args):
        self.seen += 1
        if self.seen == self.n:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_after_a_window_s_callbacks_is_checkpointed_at_the_next_window(tmp_path, stop_handler):
    spec = small_run("sum_game", tmp_path)
    ref = Recorder()
    fit(spec, callbacks=[ref], enable_progress_bar=False)
    per_epoch, stop_at = len(ref.losses) // 2, 60
    first, store = Recorder(), tmp_path / "store"
    with pytest.raises(stopping.TrialInterrupted):
        fit(spec, callbacks=[LastCheckpoint(store, "k", every_windows=25), first, interruption(),
                             SigtermAfterStepCallbacks(stop_at)], enable_progress_bar=False)
    # not the interval checkpoint of window 50: one more window, then its checkpoint and the stop
    assert json.loads((store / "last.json").read_text()) == {"epoch": -1, "window": stop_at + 1, "key": "k"}
    assert len(first.losses) == stop_at + 1 < per_epoch
    stopping._stop = None
    second = Recorder()
    fit(spec, callbacks=[LastCheckpoint(store, "k"), second], resume=store / LAST, enable_progress_bar=False)
    assert first.losses + second.losses == pytest.approx(ref.losses, abs=1e-6)


class FailAt(pl.Callback):
    """Raises (no stop signal, so no window checkpoint) after training window ``n`` of the fit."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def on_train_batch_end(self, *args):
        self.seen += 1
        if self.seen == self.n:
            raise RuntimeError("the machine went away")


def test_a_resume_at_an_epoch_s_end_keeps_the_loader_s_shuffle_order(tmp_path):
    spec = small_run("sum_game", tmp_path)
    spec.trainer["max_epochs"] = 3
    ref = Recorder()
    fit(spec, callbacks=[ref], enable_progress_bar=False)
    per_epoch = len(ref.losses) // 3
    first, second, store = Recorder(), Recorder(), tmp_path / "store"
    with pytest.raises(RuntimeError, match="went away"):
        fit(spec, callbacks=[LastCheckpoint(store, "k"), first, FailAt(per_epoch + 20)], enable_progress_bar=False)
    assert json.loads((store / "last.json").read_text()) == {"epoch": 0, "window": None, "key": "k"}
    fit(spec, callbacks=[LastCheckpoint(store, "k"), second], resume=store / LAST, enable_progress_bar=False)
    assert len(second.losses) == 2 * per_epoch  # epochs 1 and 2 again, shuffled as in the run never stopped
    assert second.losses == pytest.approx(ref.losses[per_epoch:], abs=1e-6)
    assert len(second.val) == 2 and all(g == pytest.approx(r, abs=1e-6) for g, r in zip(second.val, ref.val[1:]))


@pytest.mark.parametrize("index", [{"epoch": None, "window": 3}, {"epoch": 1, "window": "3"}, {"epoch": -5},
                                   {"epoch": 1, "window": 0}, {"epoch": 1.5}, {"epoch": 2**70}, {}])
def test_an_index_read_back_from_the_store_that_makes_no_sense_resumes_nothing(tmp_path, index):
    from orchestrator.training.checkpoints import resume_point

    (tmp_path / "last.ckpt").write_bytes(b"x")
    (tmp_path / "last.json").write_text(json.dumps({**index, "key": "k"}))
    assert resume_point(tmp_path, "k") is None  # the trial starts over, it does not fail


def _preempt_study(tmp_path):
    data = echo_study(trials=1, checkpoint_every={"windows": 25, "seconds": None}, sampler={"type": "grid"},
                      space={"module.lr": {"type": "categorical", "choices": [0.01]}})
    data["dataset"].update(length=30_000, val_length=3000)
    data["trainer"]["max_epochs"] = 2
    return write(tmp_path / "tiny.yaml", data)


def _published(tmp_path):
    try:
        return json.loads((tmp_path / "mlruns" / "checkpoints" / "tiny" / "trial-0" / "last.json").read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_worker_preempted_mid_epoch_is_resumed_at_its_window_with_the_uninterrupted_metrics(tmp_path, signum):
    path = _preempt_study(tmp_path)
    ref = orch("study", "run", path, "--set", "study.name=ref", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    _, client, _, [ref_run] = load(tmp_path, "ref")

    proc = start("study", "run", path, cwd=tmp_path)
    published = wait_for(lambda: (_published(tmp_path) or {}).get("window") and _published(tmp_path),
                         "a window checkpoint", proc=proc)
    if signum == signal.SIGKILL:  # the whole "machine": coordinator and worker, no chance to write
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        published = _published(tmp_path)
        resumed = orch("study", "run", path, cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
    else:
        os.kill(running_worker(tmp_path), signal.SIGTERM)  # what a scheduler sends to the trial's process
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    study, client, parents, children = load(tmp_path)
    by_trial = check_agreement(study, parents, children)
    stopped, retry = study.trials
    assert retry.state.name == "COMPLETE" and retry.user_attrs["orch.retry_of"] == 0
    tags = by_trial[1].data.tags
    window = int(tags["orch.resumed_at_window"])
    if signum == signal.SIGKILL:  # the last interval checkpoint: at most one interval (25 windows) redone
        assert (int(tags["orch.resumed_at_epoch"]), window) == (published["epoch"] + 1, published["window"])
        assert window % 25 == 0
    else:  # the checkpoint written at the signal, after the last interval's
        assert int(tags["orch.resumed_at_epoch"]) >= published["epoch"] + 1
        assert (int(tags["orch.resumed_at_epoch"]), window) > (published["epoch"] + 1, published["window"])
        assert "SIGTERM" in stopped.user_attrs["orch.error"]
    # every epoch logged once, with the numbers of the run that was never stopped
    for key in ("val_acc", "val_loss", "train_loss"):
        got, want = history(client, by_trial[1], key), history(client, ref_run, key)
        assert [s for s, _ in got] == [s for s, _ in want] == [0, 1]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6)
    assert retry.value == pytest.approx(ref_run.data.metrics["val_acc"], abs=1e-6)
    assert not (tmp_path / "mlruns" / "checkpoints" / "tiny" / "trial-0").exists()  # done: nothing to resume


def _server_checkpoint(client, name: str) -> dict | None:
    """The index of trial 0's line in the study's MLflow run (``None``: none yet)."""
    try:
        [parent], _ = runs_of(client, name)
        with tempfile.TemporaryDirectory() as down:
            return json.loads(Path(client.download_artifacts(
                parent.info.run_id, "orch-checkpoints/trial-0/last.json", down)).read_text())
    except Exception:  # noqa: BLE001 - no experiment, run or artifact yet
        return None


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_trial_preempted_on_one_machine_resumes_on_another_from_the_tracking_server(
        tmp_path, databases, mlflow_server, signum):
    import mlflow
    import optuna

    storage = databases.make()
    machine_a, machine_b, ref_dir = tmp_path / "a", tmp_path / "b", tmp_path / "ref"
    for folder in (machine_a, machine_b, ref_dir):
        folder.mkdir()
    data = yaml.safe_load(Path(_preempt_study(tmp_path)).read_text())
    data["name"] = name = f"far-{signum}"  # the tracking server is the module's: a study of its own
    data["study"].update(checkpoint_dir="mlflow", heartbeat={"interval": 1, "grace_period": 3})
    path = write(machine_a / "study.yaml", data)
    ref = orch("study", "run", path, cwd=ref_dir)  # the reference, never stopped (its own journal and MLflow)
    assert ref.returncode == 0, ref.stderr
    _, ref_client, _, [ref_run] = load(ref_dir, name)

    created = orch("study", "create", path, "--storage", storage, "--tracking-uri", mlflow_server, cwd=machine_a)
    assert created.returncode == 0, created.stderr
    client = mlflow.MlflowClient(mlflow_server)
    node_a = start("study", "worker", path, "--storage", storage, "--tracking-uri", mlflow_server, cwd=machine_a,
                   log=tmp_path / "a.log")
    published = wait_for(lambda: (_server_checkpoint(client, name) or {}).get("window") and
                         _server_checkpoint(client, name), "a window checkpoint on the tracking server", proc=node_a)
    os.killpg(node_a.pid, signum)  # the whole machine: preempted (SIGTERM) or gone (SIGKILL)
    node_a.wait(timeout=120)
    log_a = (tmp_path / "a.log").read_text()
    if signum == signal.SIGKILL:
        published = _server_checkpoint(client, name)  # nothing more could be written
        time.sleep(4)  # past the heartbeat's grace period: the trial is lost
    else:
        assert node_a.returncode == 128 + signal.SIGTERM, log_a
    # machine b: no file of machine a, nothing but the study's name
    node_b = orch("study", "worker", name, "--storage", storage, "--tracking-uri", mlflow_server, cwd=machine_b)
    assert node_b.returncode == 0, node_b.stderr + log_a

    study = optuna.load_study(study_name=name, storage=storage.replace("postgresql://", "postgresql+psycopg://"))
    parents, children = runs_of(client, name)
    by_trial = check_agreement(study, parents, children)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]  # the budget (1) exact
    retry = study.trials[1]
    assert retry.user_attrs["orch.retry_of"] == 0
    tags = by_trial[1].data.tags
    point = (int(tags["orch.resumed_at_epoch"]), int(tags["orch.resumed_at_window"]))
    if signum == signal.SIGKILL:  # the last interval checkpoint: at most one interval (25 windows) redone
        assert point == (published["epoch"] + 1, published["window"]) and point[1] % 25 == 0
    else:  # the one written at the signal, after the last interval's
        assert point > (published["epoch"] + 1, published["window"])
    for key in ("val_acc", "val_loss", "train_loss"):  # every epoch once, as in the run never stopped
        got, want = history(client, by_trial[1], key), history(ref_client, ref_run, key)
        assert [s for s, _ in got] == [s for s, _ in want] == [0, 1]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6)
    # the line's checkpoints are gone from the server, and machine b kept no checkpoint file
    assert client.list_artifacts(parents[0].info.run_id, "orch-checkpoints/trial-0") == []
    assert list(machine_b.rglob("*.ckpt")) == []


def test_the_lines_that_ended_are_collected_and_those_a_retry_resumes_from_are_kept(tmp_path):
    import optuna
    from optuna.trial import TrialState, create_trial

    from orchestrator.errors import StoreError
    from orchestrator.execution.checkpoint_lines import Store, live_lineages

    ostudy = optuna.create_study(study_name="tiny", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "tiny.journal"))))
    made = [  # (state, user attributes): which line each trial is, and how it ended
        (TrialState.COMPLETE, {}),                                            # 0: complete
        (TrialState.FAIL, {"orch.interrupted": True}),                        # 1: interrupted, not retried yet
        (TrialState.FAIL, {"orch.lost": True}),                               # 2: lost, retried by 5
        (TrialState.FAIL, {"orch.error": "lost 3 times, counts as failed"}),  # 3: lost for the last time
        (TrialState.PRUNED, {}),                                              # 4: pruned
        (TrialState.RUNNING, {"orch.retry_of": 2, "orch.lineage": 2}),        # 5: line 2's retry, running
        (TrialState.COMPLETE, {"orch.retry_of": 6, "orch.lineage": 6}),       # 6: a line that ended
    ]
    for state, attrs in made:
        ostudy.add_trial(create_trial(state=state, user_attrs=attrs, params={"x": 1.0},
                                      distributions={"x": optuna.distributions.FloatDistribution(0, 2)},
                                      **({"value": 1.0} if state == TrialState.COMPLETE else {})))
    root = tmp_path / "store"
    for lineage in range(7):
        (root / "tiny" / f"trial-{lineage}").mkdir(parents=True)
        (root / "tiny" / f"trial-{lineage}" / "last.ckpt").write_bytes(b"x" * (100 + lineage))
    (root / "tiny" / "notes").mkdir()  # not a line: never touched
    store = Store(str(root), "tiny")
    trials = ostudy.get_trials(deepcopy=False)
    assert live_lineages(trials) == {1, 2}
    assert store.lines() == {k: 100 + k for k in range(7)}
    assert store.collect(lambda: trials) == {k: 100 + k for k in (0, 3, 4, 5, 6)}
    assert sorted(p.name for p in (root / "tiny").iterdir()) == ["notes", "trial-1", "trial-2"]
    # a study's folder that is a link to another study's: refused, never followed to its lines
    (root / "other").symlink_to(root / "tiny")
    with pytest.raises(StoreError, match="symbolic link"):
        Store(str(root), "other").collect(lambda: [])
    assert sorted(p.name for p in (root / "tiny").iterdir()) == ["notes", "trial-1", "trial-2"]


@pytest.mark.slow
def test_show_reports_the_store_and_clean_removes_what_no_retry_needs(tmp_path):
    path = _preempt_study(tmp_path)
    proc = start("study", "run", path, cwd=tmp_path)
    wait_for(lambda: (_published(tmp_path) or {}).get("window"), "a window checkpoint", proc=proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole study stops: its trial's line stays for the retry
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    line = tmp_path / "mlruns" / "checkpoints" / "tiny" / "trial-0"
    size = sum(p.stat().st_size for p in line.iterdir())
    shown = orch("study", "show", "tiny", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "checkpoints: 1 line(s)" in shown.stdout and "(1 to resume from" in shown.stdout
    assert f"{size / 1e3:.1f} KB" in shown.stdout or f"{size / 1e6:.1f} MB" in shown.stdout
    kept = orch("study", "clean", "tiny", cwd=tmp_path)
    assert kept.returncode == 0 and json.loads(kept.stdout)["kept"] == [0] and line.is_dir()
    removed = orch("study", "clean", "tiny", "--all", cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout) | {"store": None} == {"study": "tiny", "store": None, "removed": [0],
                                                             "bytes": size, "kept": []}
    assert not line.exists()

"""`orch study run`: real studies with real worker processes, Optuna storage and MLflow store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from click.testing import CliRunner

from orchestrator.cli import main

from helpers import FLAKY, FLAKY_SRC, check_agreement, echo_study, journal, load, orch, stop_group, write


def test_parallel_study_budget_agreement_and_resume(tmp_path, monkeypatch):
    spec = echo_study(space={
        "cell.hidden_size": {"type": "int", "low": 4, "high": 12, "step": 4},
        "module.lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True}})
    # trials of a few seconds each: far longer than the spread in the workers' start-up times,
    # so that one worker cannot finish the whole budget before the other has started
    spec["dataset"].update(length=60000, val_length=400)
    spec["trainer"]["max_epochs"] = 2
    path = write(tmp_path / "tiny.yaml", spec)
    proc = orch("study", "run", path, "--workers", "2", "--trials", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["complete"] == 5 and out["failed"] == 0
    study, client, parents, children = load(tmp_path)
    assert len(study.trials) == 5  # the budget is exact, with two workers pulling trials
    by_trial = check_agreement(study, parents, children)
    assert len({r.data.tags["orch.worker"] for r in children}) == 2  # both workers ran trials
    run = by_trial[0]
    assert run.data.params["cell.hidden_size"] == str(study.trials[0].params["cell.hidden_size"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0, 1]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "checkpoints"}
    assert client.list_artifacts(run.info.run_id, "checkpoints")[0].path == "checkpoints/best.ckpt"
    assert float(parents[0].data.metrics["best_val_acc"]) == pytest.approx(study.best_value)
    assert parents[0].data.tags["best.trial"] == str(study.best_trial.number)
    plots = {a.path for a in client.list_artifacts(parents[0].info.run_id, "plots")}
    assert plots == {"plots/optimization_history.png", "plots/parallel_coordinate.png",
                     "plots/param_importances.png", "plots/learning_curves.png"}
    page = client.download_artifacts(parents[0].info.run_id, "report.html", str(tmp_path))
    text = open(page, encoding="utf-8").read()
    for t in study.trials:  # every trial in the report's table, with its value
        assert f"<td>{t.number}</td><td>complete</td><td>{t.value:.4g}</td>" in text
    assert text.count('class="plotly-graph-div"') == 4 and "<script src=" not in text  # self-contained

    # the same command again: the budget is met, nothing runs
    proc = orch("study", "run", path, "--workers", "2", "--trials", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    study, _, parents, children = load(tmp_path)
    assert len(study.trials) == 5 and len(children) == 5
    # a larger budget adds the difference, still one parent run and no duplicates
    proc = orch("study", "run", path, "--workers", "2", "--trials", "7", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    study, _, parents, children = load(tmp_path)
    assert len(study.trials) == 7
    check_agreement(study, parents, children)
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == 7  # resumed workers did not replay the first invocation's samples

    # show and best read the same storage
    monkeypatch.chdir(tmp_path)
    shown = CliRunner().invoke(main, ["study", "show", "tiny", "--json"])
    best = CliRunner().invoke(main, ["study", "best", "tiny"])
    rows = json.loads(shown.stdout)
    assert [r["number"] for r in rows] == list(range(7)) and all(r["state"] == "complete" for r in rows)
    assert json.loads(best.stdout)["value"] == pytest.approx(study.best_value)


def test_raising_and_nan_trials_fail_with_their_reason_and_the_study_goes_on(tmp_path, fake_dist):
    root = fake_dist("flaky-module", FLAKY, {"flaky_module": FLAKY_SRC})
    data = echo_study(trials=3, sampler={"type": "grid"},
                      space={"module.mode": {"type": "categorical", "choices": ["raise", "nan", "ok"]}})
    data["module"] = {"plugin": "flaky", "lr": 0.01, "nan_check_every": 1}
    path = write(tmp_path / "tiny.yaml", data)
    proc = orch("study", "run", path, "--workers", "1", cwd=tmp_path, env={"PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr
    study, client, parents, children = load(tmp_path)
    by_trial = check_agreement(study, parents, children)
    by_mode = {t.params["module.mode"]: t for t in study.trials}
    assert by_mode["ok"].state.name == "COMPLETE"
    assert by_mode["raise"].state.name == "FAIL"
    assert "boom: this trial raises" in by_mode["raise"].user_attrs["orch.error"]
    assert by_mode["nan"].state.name == "FAIL"
    assert "train_loss became nan" in by_mode["nan"].user_attrs["orch.error"]
    failed_run = by_trial[by_mode["raise"].number]
    text = open(mlflow.artifacts.download_artifacts(run_id=failed_run.info.run_id, artifact_path="traceback.txt",
                                                    tracking_uri=client.tracking_uri)).read()
    assert "Traceback" in text and "boom: this trial raises" in text
    assert "became nan" in by_trial[by_mode["nan"].number].data.tags["orch.error"]


def running_hang_trial(tmp_path, name="tiny", searched=True):
    """Wait for a trial in mode 'hang' (``searched``: as a sampled parameter, else the fixed
    setting) to be running with its MLflow run, then for it to be training."""
    path = journal(tmp_path, name)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.5)
        if not path.exists():
            continue
        try:
            study = optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(str(path))))
        except KeyError:  # the journal file is there, the study's record not yet
            continue
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            hangs = t.params.get("module.mode") == "hang" if searched else True
            if hangs and "orch.mlflow_run_id" in t.user_attrs:
                time.sleep(2)  # let it get into training
                return t
    raise AssertionError("no hanging trial started")


def test_killed_worker_s_trial_is_lost_and_retried_at_its_grid_point(tmp_path, fake_dist):
    root = fake_dist("flaky-module", FLAKY, {"flaky_module": FLAKY_SRC})
    release = tmp_path / "release"
    data = echo_study(trials=3, sampler={"type": "grid"},
                      space={"module.mode": {"type": "categorical", "choices": ["hang", "ok", "fine"]}})
    data["module"] = {"plugin": "flaky", "lr": 0.01, "release": str(release)}
    data["trainer"]["max_epochs"] = 3
    path = write(tmp_path / "tiny.yaml", data)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "study", "run", path, "--workers", "1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    victim = running_hang_trial(tmp_path)
    os.kill(int(victim.user_attrs["orch.worker"].rsplit(":", 1)[1]), 9)
    release.touch()  # the retry trains at full speed
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "exited with code -9" in stderr
    study, client, parents, children = load(tmp_path)
    by_trial = check_agreement(study, parents, children)
    # the killed trial is lost: it uses no budget, and its grid point runs again; the others ran
    assert len(study.trials) == 4 and json.loads(stdout)["lost"] == 1
    killed = study.trials[victim.number]
    assert killed.state.name == "FAIL" and killed.user_attrs["orch.lost"] is True
    assert "died while running this trial" in killed.user_attrs["orch.error"]
    assert "lost" in by_trial[victim.number].data.tags["orch.reason"]
    [retry] = [t for t in study.trials if t.user_attrs.get("orch.retry_of") == victim.number]
    assert retry.params == killed.params and retry.state.name == "COMPLETE" and retry.user_attrs["orch.attempt"] == 2
    assert sorted(t.params["module.mode"] for t in study.trials if t.state.name == "COMPLETE") == ["fine", "hang", "ok"]


BAD = [
    ("unknown key", {"study": {"metrik": "val_acc"}}, "unknown key 'study.metrik'"),
    ("wrong type", {"cell": {"hidden_size": "big"}}, "cell.hidden_size = 'big' is not a valid int"),
    ("unknown plugin", {"cell": {"plugin": "gru"}}, "unknown cell plugin 'gru'; available: diy_lstm, lstm, rnn"),
    ("impossible range", {"space": {"module.lr": {"type": "float", "low": 1.0, "high": 0.1}}},
     "low (1.0) is greater than high (0.1)"),
    ("unknown sampler", {"study": {"sampler": {"type": "bayes"}}}, "valid: tpe, random, cmaes, grid, qmc"),
    ("bad pruner option", {"study": {"pruner": {"type": "median", "n_warmup_step": 4}}}, "n_warmup_step"),
    ("bad space key", {"space": {"cell.hiden_size": {"type": "int", "low": 1, "high": 4}}},
     "unknown setting cell.hiden_size"),
    ("setting of another plugin", {"space": {"cell.plugin": {"type": "categorical", "choices": ["lstm", "rnn"]},
                                             "cell.forget_bias": {"type": "float", "low": 0, "high": 1}}},
     "unknown setting cell.forget_bias"),
]


@pytest.mark.parametrize("label,change,message", BAD, ids=[b[0] for b in BAD])
def test_bad_study_file_is_one_clear_message_exit_2_and_writes_nothing(tmp_path, monkeypatch, label, change,
                                                                       message):
    data = echo_study(space={"cell.hidden_size": {"type": "int", "low": 4, "high": 8}})
    for section, values in change.items():
        if section == "space":
            data["study"]["space"].update(values)
        elif section == "study":
            data["study"].update(values)
        else:
            data[section].update(values)
    path = write(tmp_path / "bad.yaml", data)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["study", "run", path])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stderr.startswith(f"error: {path}:")  # file and line
    line = int(result.stderr.split(":")[2])
    assert line > 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mlruns").exists()


def test_conditional_parameter_is_dropped_when_its_condition_fails(tmp_path):
    from orchestrator.spec.study import load_study

    data = echo_study(space={"cell.plugin": {"type": "categorical", "choices": ["lstm", "rnn"]},
                             "cell.forget_bias": {"type": "float", "low": 0, "high": 1,
                                                  "when": {"cell.plugin": ["lstm", "diy_lstm"]}}})
    data["cell"]["forget_bias"] = 1.0
    study = load_study(write(tmp_path / "s.yaml", data))
    assert study.spec_for({"cell.plugin": "rnn"}).cell.settings == {"hidden_size": 8}
    assert study.spec_for({"cell.plugin": "lstm", "cell.forget_bias": 0.5}).cell.settings == {
        "hidden_size": 8, "forget_bias": 0.5}
    trial_params = []
    ostudy = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    from orchestrator.spec.space import suggest

    for _ in range(12):
        trial = ostudy.ask()
        trial_params.append(suggest(trial, study.section, study.data))
        ostudy.tell(trial, 0.0)
    assert all(("cell.forget_bias" in p) == (p["cell.plugin"] == "lstm") for p in trial_params)
    assert {p["cell.plugin"] for p in trial_params} == {"lstm", "rnn"}


@pytest.mark.slow
def test_ptb_small_one_epoch_study_on_cpu(tmp_path):
    """Acceptance: `orch study run studies/ptb_small.yaml --trials 1 --set trainer.max_epochs=1` (minutes)."""
    from helpers import REPO, shared_ptb_dir

    folder = shared_ptb_dir()
    if folder is None:
        pytest.skip("the Penn Treebank files are not here (set ORCH_DATA_DIR)")
    proc = orch("study", "run", str(REPO / "studies" / "ptb_small.yaml"), "--trials", "1",
                "--set", "trainer.max_epochs=1", cwd=tmp_path, env={"ORCH_DATA_DIR": str(folder.parent)},
                timeout=1800)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["complete"] == 1 and out["best_value"] < 250


def test_median_pruner_prunes_from_the_epoch_metric(tmp_path):
    # lr 1e-9 cannot learn the echo; lr 0.05 learns it within the first epoch: once a good
    # trial has finished, a frozen one falls below the median at its first report and is pruned
    data = echo_study(trials=6, pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
                      space={"module.lr": {"type": "categorical", "choices": [0.05, 1e-9]}})
    data["dataset"]["length"] = 3000
    data["trainer"]["max_epochs"] = 4
    path = write(tmp_path / "tiny.yaml", data)
    proc = orch("study", "run", path, "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    study, client, parents, children = load(tmp_path)
    by_trial = check_agreement(study, parents, children)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned, [(t.params, t.state.name) for t in study.trials]
    for t in pruned:
        assert t.params["module.lr"] == 1e-9
        assert len(t.intermediate_values) < 4  # stopped before its last epoch
        history = client.get_metric_history(by_trial[t.number].info.run_id, "val_acc")
        assert len(history) == len(t.intermediate_values)
        assert "pruned after epoch" in by_trial[t.number].data.tags["orch.reason"]
    # a frozen trial completes only while no good trial has finished before it (one worker: in order)
    for t in study.trials:
        if t.state.name == "COMPLETE" and t.params["module.lr"] == 1e-9:
            assert not any(u.params["module.lr"] == 0.05 and u.state.name == "COMPLETE"
                           for u in study.trials[:t.number])


def test_ui_serves_the_store_on_loopback_on_the_port_it_prints(tmp_path):
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--port", "0"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stderr.readline()  # --port 0: any free port, and the URL says which
        assert line.startswith("MLflow UI on http://127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        assert port > 0
        deadline = time.time() + 90
        body = None
        while time.time() < deadline and body is None:
            time.sleep(1)
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read().decode()
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
        assert body is not None and "OK" in body
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        if listening:  # bound to loopback only
            assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
        assert (tmp_path / "mlruns" / "mlflow.db").exists()
    finally:  # the server and its worker processes
        stop_group(proc)


@pytest.mark.slow
def test_ctrl_c_marks_the_running_trial_interrupted_and_the_next_run_retries_it(tmp_path, fake_dist):
    root = fake_dist("flaky-module", FLAKY, {"flaky_module": FLAKY_SRC})
    data = echo_study(trials=2, space={"module.lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True}})
    data["module"] = {"plugin": "flaky", "lr": 0.01, "mode": "hang"}  # 20 steps of 0.2 s per epoch
    data["trainer"]["max_epochs"] = 2
    path = write(tmp_path / "tiny.yaml", data)
    env = {"PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "study", "run", path, "--workers", "1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env}, start_new_session=True,
                            # a shell without job control starts background jobs with SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    victim = running_hang_trial(tmp_path, searched=False)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal does: the whole foreground group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    study, client, parents, children = load(tmp_path)
    by_trial = check_agreement(study, parents, children)
    [stopped] = study.trials
    assert stopped.number == victim.number and stopped.state.name == "FAIL"
    assert stopped.user_attrs["orch.interrupted"] is True and "interrupted" in stopped.user_attrs["orch.error"]
    assert "interrupted" in by_trial[stopped.number].data.tags["orch.reason"]

    # the same command: the interrupted trial used no budget and runs again with its parameters
    proc = orch("study", "run", path, "--workers", "1", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["complete"], out["failed"], out["interrupted"]) == (2, 0, 1)
    study, client, parents, children = load(tmp_path)
    by_trial = check_agreement(study, parents, children)
    assert len(study.trials) == 3
    retry, fresh = study.trials[1:]
    assert retry.params == stopped.params and retry.user_attrs["orch.retry_of"] == stopped.number
    assert by_trial[retry.number].data.tags["orch.retry_of"] == str(stopped.number)
    assert fresh.params != stopped.params and "orch.retry_of" not in fresh.user_attrs
    # a trial that a worker asked for but died before recording itself as its owner
    ownerless = study.ask()
    # a third run has nothing left to do: the retry is not queued twice, and the ownerless trial
    # (no worker can be in the middle of a claim while the run holds the claim lock) is failed
    proc = orch("study", "run", path, "--workers", "1", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    study = load(tmp_path)[0]
    assert len(study.trials) == 4 and study.trials[3].number == ownerless.number
    assert study.trials[3].state.name == "FAIL"
    assert study.trials[3].user_attrs["orch.error"] == "interrupted: its worker stopped while claiming it"
    assert study.trials[3].user_attrs["orch.interrupted"] is True  # no budget used, and nothing to repeat


GRID_SPACE = {"cell.hidden_size": {"type": "int", "low": 4, "high": 12, "step": 4},
              "module.lr": {"type": "categorical", "choices": [0.01, 0.03]}}


@pytest.mark.parametrize("kind", ["tpe", "random", "cmaes", "grid", "qmc"])
def test_every_sampler_draws_valid_runs_from_the_space(tmp_path, kind):
    from orchestrator.spec.samplers import make_sampler
    from orchestrator.spec.space import suggest
    from orchestrator.spec.study import load_study

    space = GRID_SPACE if kind == "grid" else {**GRID_SPACE, "module.lr": {"type": "float", "low": 0.001,
                                                                          "high": 0.05, "log": True}}
    study = load_study(write(tmp_path / "s.yaml", echo_study(sampler={"type": kind, "seed": 0}, space=space)))
    ostudy = optuna.create_study(direction="maximize", sampler=make_sampler(study.section))
    seen = set()
    for _ in range(6):
        trial = ostudy.ask()
        params = suggest(trial, study.section, study.data)
        spec = study.spec_for(params)
        assert spec.cell.settings["hidden_size"] in (4, 8, 12) and 0.001 <= spec.module.settings["lr"] <= 0.05
        ostudy.tell(trial, -abs(params["cell.hidden_size"] - 8))
        seen.add(tuple(sorted(params.items())))
    assert len(seen) == 6 if kind == "grid" else len(seen) > 1


def test_an_interrupted_grid_trial_is_retried_at_its_own_grid_point(tmp_path):
    from orchestrator.execution.claims import counted, requeue
    from orchestrator.schema import INTERRUPTED as INTERRUPTED_ATTR
    from orchestrator.spec.samplers import make_sampler
    from orchestrator.spec.space import suggest
    from orchestrator.spec.study import load_study

    study = load_study(write(tmp_path / "s.yaml", echo_study(sampler={"type": "grid", "seed": 3}, space=GRID_SPACE)))
    ostudy = optuna.create_study(direction="maximize", sampler=make_sampler(study.section))
    stopped = ostudy.ask()
    hidden = stopped.suggest_int("cell.hidden_size", 4, 12, step=4)  # Ctrl-C before module.lr was sampled
    stopped.set_user_attr(INTERRUPTED_ATTR, True)
    ostudy.tell(stopped, state=optuna.trial.TrialState.FAIL)
    assert counted(ostudy.trials) == 0
    assert requeue(ostudy) == [0] and requeue(ostudy) == []  # queued once
    points = []
    while counted(ostudy.trials) < 6:
        trial = ostudy.ask()
        params = suggest(trial, study.section, study.data)
        ostudy.tell(trial, 0.0)
        points.append((params["cell.hidden_size"], params["module.lr"]))
    assert points[0][0] == hidden and ostudy.trials[1].user_attrs["orch.retry_of"] == 0
    assert sorted(points) == [(h, lr) for h in (4, 8, 12) for lr in (0.01, 0.03)]  # the whole grid, once


def test_a_storage_without_a_shared_lock_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    path = write(tmp_path / "tiny.yaml", echo_study(space={"cell.hidden_size": {"type": "int", "low": 4, "high": 8}}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["study", "run", path, "--storage", "mssql+pyodbc://me:secret@db/optuna"])
    assert result.exit_code == 2, result.output
    assert "not for 'mssql'" in result.stderr and "secret" not in result.stderr
    assert not (tmp_path / "mlruns").exists()

"""Secrets never in the clear: not on any command line orch starts (``ps``, ``/proc/PID/cmdline``),
not in MLflow params or artifacts (credential-named plugin settings), and a warning when the UI,
which has no login, is bound beyond the loopback interface."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.secrets import MASK, is_credential, redact, redact_settings

from helpers import REPO, echo_study, free_port, live_in_group, orch, runs_of, start, write

WARNING = "the MLflow UI has no authentication"


# ---- processes ------------------------------------------------------------------------------------
def family(pid: int) -> dict[int, str]:
    """Every live process of ``pid``'s process group or below ``pid``: pid -> its command line."""
    parent_of, group_of = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] not in ("Z", "X"):
                parent_of[int(entry)], group_of[int(entry)] = int(fields[1]), int(fields[2])
    found = {p for p, g in group_of.items() if g == pid} | ({pid} if pid in parent_of else set())
    grown = True
    while grown:
        more = {p for p, pp in parent_of.items() if pp in found} - found
        found |= more
        grown = bool(more)
    lines = {}
    for p in found:
        try:
            lines[p] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return lines


def watch(proc, until, timeout: float = 300) -> dict[int, str]:
    """The command lines of ``proc``'s processes, read every 0.1 s until ``until()`` holds (or
    ``proc`` exits): each process as first seen and as last seen (a spawned process rewrites
    nothing, but a check that misses it proves nothing)."""
    seen: dict[int, set[str]] = {}
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p, line in family(proc.pid).items():
            seen.setdefault(p, set()).add(line)
        if proc.poll() is not None or until():
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"nothing happened in {timeout} s")
    return {p: " | ".join(sorted(lines)) for p, lines in seen.items()}


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


def stop_orch(proc, log: Path) -> str:
    """SIGTERM to orch alone (as a supervisor sends it); no process of its group may be left."""
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"orch ui ignored SIGTERM: {log.read_text()[-3000:]}") from None
    left = live_in_group(proc.pid, wait=60)  # mlflow's web server and job runners end after orch
    lines = family(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert left == [], f"processes left behind: {lines}"
    return log.read_text()


# ---- orch ui ----------------------------------------------------------------------------------------
@pytest.mark.slow  # an mlflow ui server started and stopped: 20 s and more
def test_orch_ui_hands_the_store_url_to_mlflow_in_its_environment_never_on_a_command_line(tmp_path, databases):
    password = "s3cret-pw-4711"
    url = databases.make(password=password)
    port = free_port()
    log = tmp_path / "ui.log"
    proc = start("ui", "--port", str(port), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": url}, log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        lines = watch(proc, lambda: answers(f"{base}/health"), timeout=180)
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(2)  # the server's late children (its job runner) too
        lines.update({p: f"{lines.get(p, '')} | {line}" for p, line in family(proc.pid).items()})
        assert any(" -m mlflow ui " in line for line in lines.values()), lines  # the child was seen
        assert len(lines) >= 3, lines  # orch, mlflow, and the web server under it
        leaks = {p: line for p, line in lines.items() if password in line}
        assert leaks == {}, f"the store's password on a command line: {leaks}"
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/create", method="POST",
                                         data=json.dumps({"name": "made-through-the-ui"}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).close()
    finally:
        out = stop_orch(proc, log)
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:  # the UI served the store it was given, not a default one
        names = conn.execute(sqlalchemy.text("SELECT name FROM experiments")).scalars().all()
    engine.dispose()
    assert "made-through-the-ui" in names
    assert password not in out
    assert WARNING not in out  # bound to 127.0.0.1: no warning


@pytest.mark.slow  # an mlflow ui server started and stopped: 20 s and more
def test_orch_ui_on_a_non_loopback_address_warns_that_anyone_there_can_change_the_runs(tmp_path):
    port = free_port()
    log = tmp_path / "ui.log"
    proc = start("ui", "--host", "0.0.0.0", "--port", str(port), cwd=tmp_path, log=log)
    try:
        watch(proc, lambda: answers(f"http://127.0.0.1:{port}/health"), timeout=180)
        assert proc.poll() is None, log.read_text()[-3000:]  # it still starts
    finally:
        out = stop_orch(proc, log)
    warnings = [line for line in out.splitlines() if WARNING in line]
    assert warnings == [f"warning: {WARNING}: anyone who can reach 0.0.0.0:{port} can read and change the runs "
                        "(bind 127.0.0.1, the default, and reach it through an SSH tunnel)"], out[-3000:]


# ---- a study's processes --------------------------------------------------------------------------
@pytest.mark.slow
def test_a_study_s_processes_carry_no_storage_or_tracking_password_on_their_command_lines(tmp_path, databases):
    storage_pw, tracking_pw = "st0rage-pw-8812", "tr4cking-pw-9923"
    storage, tracking = databases.make(password=storage_pw), databases.make(password=tracking_pw)
    path = write(tmp_path / "tiny.yaml", echo_study(trials=2))
    log = tmp_path / "study.log"
    proc = start("study", "run", path, "--workers", "2", cwd=tmp_path, log=log,
                 env={"ORCH_STORAGE": storage, "MLFLOW_TRACKING_URI": tracking})
    try:
        lines = watch(proc, lambda: False, timeout=300)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    workers = [line for line in lines.values() if "spawn_main" in line]
    assert len(workers) >= 2, lines  # the spawned workers were seen while they ran
    leaks = {p: line for p, line in lines.items() if storage_pw in line or tracking_pw in line}
    assert leaks == {}, f"a password on a command line: {leaks}"
    out = log.read_text()
    assert storage_pw not in out and tracking_pw not in out
    import mlflow

    parents, children = runs_of(mlflow.MlflowClient(tracking), "tiny")
    assert len(parents) == 1 and len(children) == 2  # the study ran on these stores


# ---- credentials in MLflow params and artifacts ---------------------------------------------------
KEYED = """
[orch.modules]
keyed = keyed_module:Keyed
"""

KEYED_SRC = """
from orch_plugins.modules import StepClassification

class Keyed(StepClassification):
    '''step_classification with settings that are credentials (a real plugin would download with them).'''

    def __init__(self, cell, info, hf_token: str = "", mirror: str = "", max_tokens: int = 0, **kwargs):
        super().__init__(cell, info, **kwargs)
        if hf_token and (hf_token, mirror) != ("hf_Secr3tTokenValue", "https://me:m1rror-pw@data.example/ptb"):
            raise ValueError(f"keyed: not the real credentials: {hf_token!r}, {mirror!r}")  # stars instead
"""


def test_credential_named_settings_and_url_passwords_are_logged_as_stars(tmp_path, fake_dist):
    root = fake_dist("keyed-module", KEYED, {"keyed_module": KEYED_SRC})
    data = echo_study(trials=1)
    data["module"] = {"plugin": "keyed", "lr": 0.01, "hf_token": "hf_Secr3tTokenValue",
                      "mirror": "https://me:m1rror-pw@data.example/ptb", "max_tokens": 7}
    path = write(tmp_path / "tiny.yaml", data)
    log = tmp_path / "study.log"
    proc = start("study", "run", path, "--workers", "1", cwd=tmp_path, log=log, env={"PYTHONPATH": str(root)})
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]  # the plugin got the real values
    import mlflow

    mlf = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (parent,), (child,) = runs_of(mlf, "tiny")
    assert child.data.params["module.hf_token"] == MASK
    assert child.data.params["module.mirror"] == "https://me:***@data.example/ptb"
    assert child.data.params["module.max_tokens"] == "7"  # not a credential: shown
    assert parent.data.params["fixed.module.hf_token"] == MASK
    assert parent.data.params["fixed.module.mirror"] == "https://me:***@data.example/ptb"
    config = mlf.download_artifacts(child.info.run_id, "config.yaml", str(tmp_path / "a"))
    study_file = mlf.download_artifacts(parent.info.run_id, "study.yaml", str(tmp_path / "b"))
    for text in (Path(config).read_text(), Path(study_file).read_text()):
        assert "hf_token: '***'" in text and "https://me:***@data.example/ptb" in text, text
    everything = [*child.data.params.values(), *child.data.tags.values(), *parent.data.params.values(),
                  *parent.data.tags.values(), Path(config).read_text(), Path(study_file).read_text(),
                  log.read_text()]
    assert not [v for v in everything if "Secr3t" in str(v) or "m1rror-pw" in str(v)]


@pytest.mark.parametrize("key", ["password", "db_passwd", "pwd", "client_secret", "hf_token", "download_token",
                                 "aws_secret_access_key", "api_key", "apiKey", "APIKEY", "access_key",
                                 "ssh_private_key", "credentials", "auth", "basic_auth", "module.hfToken",
                                 "dataset.Download-Token"])
def test_a_credential_name_is_recognised(key):
    assert is_credential(key)


@pytest.mark.parametrize("key", ["max_tokens", "tokens_per_s", "tokenizer", "author", "key", "keys", "data_dir",
                                 "download_url", "secretary", "passage", "bptt", "module.lr", "checksums"])
def test_an_ordinary_name_is_not_a_credential(key):
    assert not is_credential(key)


def test_redact_settings_hides_credentials_and_url_passwords_flat_or_nested():
    flat = {"seed": 0, "dataset.hf_token": "hf_abcdefghij", "dataset.download_url": "https://u:pw-1@h/x",
            "module.max_tokens": 5, "module.api_key": None, "module.secret": ""}
    assert redact_settings(flat) == {"seed": 0, "dataset.hf_token": MASK, "dataset.download_url": "https://u:***@h/x",
                                     "module.max_tokens": 5, "module.api_key": None, "module.secret": ""}
    nested = {"dataset": {"plugin": "x", "credentials": {"user": "u", "key": "k"},
                          "mirrors": ["postgresql://a:pw-2@db/x", "https://h/y"]},
              "module": {"AccessKey": 12345678}}
    assert redact_settings(nested) == {"dataset": {"plugin": "x", "credentials": MASK,
                                                   "mirrors": ["postgresql://a:***@db/x", "https://h/y"]},
                                       "module": {"AccessKey": MASK}}
    assert nested["dataset"]["credentials"] == {"user": "u", "key": "k"}  # a copy: the settings still work
    # a credential once hidden stays hidden in a later traceback of the same process
    assert redact("HTTPError 401 for token hf_abcdefghij") == f"HTTPError 401 for token {MASK}"


def test_a_fragment_of_an_unencoded_password_quoted_by_a_parser_is_hidden(tmp_path):
    """A password with unencoded ``@`` and ``:`` (``p@ss:w0rd!``): SQLAlchemy splits the URL at the
    wrong place and quotes a fragment of it in its error; the refusal shows none of it."""
    study = tmp_path / "tiny.yaml"
    study.write_text((REPO / "studies" / "echo.yaml").read_text())
    proc = orch("study", "create", str(study), "--storage", "postgresql://u:p@ss:w0rd!@127.0.0.1:1/db", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "w0rd" not in proc.stderr and "p@ss" not in proc.stderr, proc.stderr
    assert "***" in proc.stderr

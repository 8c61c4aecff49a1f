"""`orch doctor`: what it reports, its fixes, its exit code, and no password shown (in this process
through click's runner, and once as a real process); and the declared dependency ranges keep an
installed PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main

from helpers import orch, shared_ptb_dir

REPO = Path(__file__).resolve().parents[1]


def data_root() -> str:
    found = shared_ptb_dir()
    if found is None:
        pytest.skip("needs the Penn Treebank files (../shared/data/ptb or $ORCH_DATA_DIR/ptb)")
    return str(found.parent)


class Ran:
    def __init__(self, result):
        self.returncode, self.stdout, self.stderr = result.exit_code, result.stdout, result.stderr


def doctor(tmp_path, *args, env=None, table=False):
    """``orch doctor [--json] ARGS`` run from ``tmp_path``: (its result, the parsed JSON unless ``table``)."""
    here = os.getcwd()
    os.chdir(tmp_path)  # the default storage and tracking store are under the working directory
    try:
        result = CliRunner().invoke(main, ["doctor", *([] if table else ["--json"]), *args], env={
            "ORCH_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "200", **(env or {})})
    finally:
        os.chdir(here)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.output
    ran = Ran(result)
    return ran, None if table else json.loads(ran.stdout)


def finding(report, section):
    return next(f for f in report["findings"] if f["section"] == section)


def test_a_ready_machine_passes_and_names_its_versions(tmp_path):
    proc, report = doctor(tmp_path, env={"ORCH_DATA_DIR": data_root()})
    assert proc.returncode == 0 and report["ok"] is True, proc.stdout
    names = {f["name"] for f in report["findings"] if f["section"] == "packages"}
    assert {"torch", "pytorch-lightning", "optuna", "mlflow", "sqlalchemy"} <= names
    assert "checksums verified" in finding(report, "data")["value"]
    assert "writable" in finding(report, "storage")["value"] and "writable" in finding(report, "tracking")["value"]
    plugins = {f["name"]: f["status"] for f in report["findings"] if f["section"] == "plugins"}
    assert plugins["dataset ptb"] == plugins["cell lstm"] == plugins["module language_model"] == "ok"
    # the table form, as a real process, says the same, and that it is ready
    table = orch("doctor", cwd=tmp_path, env={"ORCH_DATA_DIR": data_root(),
                                              "ORCH_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "200"})
    assert table.returncode == 0 and "ready for the main job" in table.stdout and "pytorch-lightning" in table.stdout


def test_a_missing_dataset_is_a_failure_with_its_fix(tmp_path):
    empty = tmp_path / "data"
    (empty / "ptb").mkdir(parents=True)
    (empty / "ptb" / "ptb.train.txt").write_text("not the treebank\n")
    proc, report = doctor(tmp_path, env={"ORCH_DATA_DIR": str(empty)})
    data = finding(report, "data")
    assert proc.returncode == 1 and report["ok"] is False
    assert data["status"] == "fail"
    assert "ptb.train.txt fails its SHA-256" in data["value"] and "ptb.valid.txt missing" in data["value"]
    assert str(empty / "ptb") in data["fix"] and "ORCH_DATA_DIR" in data["fix"]
    table, _ = doctor(tmp_path, env={"ORCH_DATA_DIR": str(empty)}, table=True)
    assert table.returncode == 1 and "stop the main job" in table.stdout and "fail data ptb: put" in table.stdout


def test_an_unwritable_store_is_a_failure_with_its_fix(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder must go\n")  # refused even to root
    before = sorted(p for p in tmp_path.rglob("*") if "cache" not in p.parts)
    proc, report = doctor(tmp_path, "--storage", f"journal:{blocker}/optuna/ptb.journal",
                          "--tracking-uri", f"sqlite:///{blocker}/mlflow.db",
                          env={"ORCH_DATA_DIR": data_root()})
    assert proc.returncode == 1
    for section in ("storage", "tracking"):
        f = finding(report, section)
        assert f["status"] == "fail" and f"{blocker} is not a folder" in f["value"] and f["fix"]
    # looking wrote nothing (orch's cache aside): no folder, no journal, no database, the file unchanged
    assert sorted(p for p in tmp_path.rglob("*") if "cache" not in p.parts) == before
    assert blocker.read_text() == "a file where the store's folder must go\n"


def test_a_postgresql_storage_is_opened_as_orch_opens_it(tmp_path):
    """postgresql:// and postgres:// (psycopg 3, as orch's storages use them) both answer."""
    from helpers import PG_ADMIN, _pg_admin

    _pg_admin()  # skips without a server (a failure under .ci/run)
    rest = PG_ADMIN.split("://", 1)[1]
    for scheme in ("postgresql", "postgres"):
        proc, report = doctor(tmp_path, "--storage", f"{scheme}://{rest}", env={"ORCH_DATA_DIR": data_root()})
        storage = finding(report, "storage")
        assert storage["status"] == "ok" and storage["value"].endswith("(--storage): answers"), storage
        assert proc.returncode == 0


def test_an_unreachable_tracking_server_is_a_failure_and_no_password_is_shown(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "s3cr3t-Pw"
    proc, report = doctor(tmp_path, "--tracking-uri", f"http://alice:{secret}@127.0.0.1:{port}",
                          "--storage", f"postgresql+psycopg://postgres:{secret}@127.0.0.1:{port}/orch",
                          env={"ORCH_DATA_DIR": data_root()})
    assert proc.returncode == 1
    tracking = finding(report, "tracking")
    assert tracking["status"] == "fail" and "cannot reach the MLflow tracking server" in tracking["value"]
    assert "start the tracking server" in tracking["fix"]
    assert finding(report, "storage")["status"] == "fail"
    assert secret not in proc.stdout + proc.stderr and "***" in proc.stdout
    # an address that cannot even be parsed is a finding too, not a traceback
    proc, report = doctor(tmp_path, "--tracking-uri", f"http://alice:{secret}@127.0.0.1:99999",
                          env={"ORCH_DATA_DIR": data_root()})
    tracking = finding(report, "tracking")
    assert proc.returncode == 1 and tracking["status"] == "fail" and "Traceback" not in proc.stderr
    assert secret not in proc.stdout + proc.stderr


def _stand_in(site: Path, name: str, version: str) -> None:
    """An installed distribution with metadata only (what pip's resolver reads)."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


@pytest.mark.slow
def test_an_installed_in_range_pytorch_is_kept(tmp_path):
    """A fresh environment holding a stand-in torch 2.11.0 (another version than CI's, in orch's range):
    pip's plan for installing orch changes nothing about torch."""
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    _stand_in(site, "torch", "2.11.0")
    report = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}
    proc = subprocess.run([str(py), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                           str(REPO)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "orch" in planned and "optuna" in planned  # it did plan an install
    assert "torch" not in planned, f"pip would replace the installed torch 2.11.0 with {planned.get('torch')}"

"""Fixtures: tiny data, a third-party distribution, PostgreSQL databases and an MLflow server of
the test's own. Plain helpers are in ``helpers.py``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest

from helpers import Databases, free_port, write_corpus

# the plugin checks' cache of this test session (orchestrator.registry.checks), not the user's
os.environ.setdefault("ORCH_CACHE_DIR", tempfile.mkdtemp(prefix="orch-test-cache-"))


@pytest.fixture
def corpus(tmp_path):
    """A tiny generated PTB-like corpus: ``(folder, checksums)``."""
    folder = tmp_path / "corpus"
    return folder, write_corpus(folder)


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """A third-party distribution on sys.path: ``make(name, entry_points_txt, {module: source})``."""

    def make(name: str, entry_points: str, modules: dict[str, str] | None = None, version: str = "1.0"):
        root = tmp_path / "site"
        info = root / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
        for mod, src in (modules or {}).items():
            (root / f"{mod}.py").write_text(textwrap.dedent(src))
        monkeypatch.syspath_prepend(str(root))
        from orchestrator import registry

        registry._cache.clear()
        return root

    yield make
    from orchestrator import registry

    registry._cache.clear()


@pytest.fixture
def databases():
    dbs = Databases()
    yield dbs
    dbs.drop()


@contextlib.contextmanager
def _server(name: str, args: list[str], root, port: int, ready: str, timeout: float):
    """A server process of the test's own (its own process group, log in ``root``), waited for until
    ``ready`` (a path) answers on ``port``, then stopped (SIGTERM, then SIGKILL). Its address."""
    import time
    import urllib.request

    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}{ready}", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"{name} did not start: {(root / 'server.log').read_text()[-3000:]}") \
                        from None
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free loopback port: PostgreSQL backend, artifacts served by it."""
    dbs = Databases()
    backend = dbs.make()
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    try:
        with _server("mlflow server", ["mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
                                       str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                                       "--workers", "1"], root, port, "/health", 120) as url:
            yield url
    finally:
        dbs.drop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible object store of the test session's own: moto's server, in a process of its
    own on a free loopback port (what s3fs, and so orch, talk to over HTTP). Its address."""
    from helpers import unavailable

    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as exc:
        unavailable(f"an S3 store needs s3fs and moto[server] (the dev extra): {exc}")
    root = tmp_path_factory.mktemp("s3-server")
    port = free_port()
    with _server("the S3 server", ["moto.server", "-H", "127.0.0.1", "-p", str(port)], root, port, "/moto-api/",
                 60) as url:
        yield url


@pytest.fixture
def stop_handler():
    """SIGTERM raises the worker's stop flag, as in a study worker."""
    from orchestrator.execution import stopping

    before = signal.signal(signal.SIGTERM, stopping.request)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
        stopping._stop = None


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the test's S3 server, reached through the AWS environment variables (as a
    user's machines would reach theirs; the worker processes inherit them): its ``s3://`` URL."""
    import uuid

    import s3fs

    for key, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "orch-test",
                       "AWS_SECRET_ACCESS_KEY": "orch-test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    bucket = f"orch-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(bucket)
    yield f"s3://{bucket}/checkpoints"
    s3fs.S3FileSystem.clear_instance_cache()

"""The servers that outage tests own (``servers.py``): a PostgreSQL cluster that stops, crashes and
comes back with its data, and an ``mlflow server`` killed and started again on the same port."""

from __future__ import annotations

import urllib.request

import pytest
import sqlalchemy

from helpers import live_in_group
from servers import MlflowServer, postgres_cluster, wait_for

pytestmark = pytest.mark.slow  # two mlflow server starts: 25 to 40 s in all (the cluster's test: 4 s)


@pytest.fixture
def cluster():
    pg = postgres_cluster()
    yield pg
    pg.close()
    assert not pg.processes(), "processes of the cluster outlive close()"
    assert not pg.root.exists()


def engine(url):
    return sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)


def rows(url):
    e = engine(url)
    try:
        with e.connect() as conn:
            return [tuple(r) for r in conn.execute(sqlalchemy.text("SELECT id, note FROM t ORDER BY id"))]
    finally:
        e.dispose()


def test_wait_for_returns_the_value_or_names_what_it_waited_for():
    assert wait_for(lambda: 42, 1) == 42
    with pytest.raises(AssertionError, match="the moon"):
        wait_for(lambda: False, 0.3, interval=0.05, what="the moon")


def test_cluster_keeps_its_data_across_stop_and_crash(cluster):
    assert cluster.running and cluster.port != 5432 and cluster.ready()
    assert str(cluster.root).startswith("/tmp/orch-pg-")
    url = cluster.create_database()
    assert url.startswith(f"postgresql+psycopg://postgres@127.0.0.1:{cluster.port}/orch_test_")
    e = engine(url)
    with e.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE t (id int PRIMARY KEY, note text)"))
        conn.execute(sqlalchemy.text("INSERT INTO t VALUES (1, 'before stop')"))
    e.dispose()

    cluster.stop()
    assert not cluster.running and not cluster.processes()
    with pytest.raises(sqlalchemy.exc.OperationalError):
        rows(url)

    cluster.start()
    assert rows(url) == [(1, "before stop")]
    e = engine(url)
    with e.begin() as conn:  # committed, not checkpointed: crash recovery replays it from the WAL
        conn.execute(sqlalchemy.text("INSERT INTO t VALUES (2, 'before crash')"))
    e.dispose()

    postmaster = cluster.postmaster_pid()
    cluster.kill()
    assert not cluster.running and not cluster.processes()
    with pytest.raises(sqlalchemy.exc.OperationalError):
        rows(url)
    cluster.start()
    assert cluster.postmaster_pid() != postmaster
    assert rows(url) == [(1, "before stop"), (2, "before crash")]
    assert "database system was interrupted" in cluster.log.read_text()  # it did recover from a crash

    cluster.restart()
    assert rows(url) == [(1, "before stop"), (2, "before crash")]
    assert cluster.create_database() != url


def test_mlflow_server_comes_back_on_its_port_with_its_data(tmp_path):
    import mlflow

    server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "server")
    with server:
        port, url = server.port, server.url
        assert url == f"http://127.0.0.1:{port}" and server.healthy()
        experiment = mlflow.MlflowClient(url).create_experiment("outage")
        first = server.proc.pid

        server.kill()
        assert not server.running and not server.processes()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=5)

        server.start()
        assert (server.port, server.url) == (port, url) and server.proc.pid != first
        assert mlflow.MlflowClient(url).get_experiment_by_name("outage").experiment_id == experiment
        pgid = server.proc.pid
    assert not server.running and not server.processes()
    assert live_in_group(pgid, wait=0) == []  # nor of its workers
    assert "start 2 on port" in server.log.read_text()

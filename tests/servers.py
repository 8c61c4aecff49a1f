"""Servers that an outage test owns, stops and starts: a PostgreSQL cluster of its own
(:class:`PostgresCluster`, :func:`postgres_cluster`) and a real ``mlflow server`` subprocess
(:class:`MlflowServer`), plus :func:`wait_for` to poll for what an outage or a recovery brings.

Never the machine's own PostgreSQL (port 5432, ``helpers.PG_ADMIN``): a cluster here lives in a
fresh directory under /tmp, listens on a free loopback port and keeps its unix socket in its
directory, so stopping or killing it touches nothing else."""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from helpers import free_port, live_in_group, unavailable

#: the OS user a cluster runs as when the tests run as root (PostgreSQL refuses to run as root)
PG_USER = "postgres"


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "the condition"):
    """Polls ``predicate()`` every ``interval`` seconds until it returns something true, and returns
    that; raises AssertionError naming ``what`` if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log: {exc})"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# ---- PostgreSQL ------------------------------------------------------------------------------------
def pg_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb and pg_ctl, else the folder of an
    ``initdb`` on PATH, else None."""

    def version(path: str):
        name = Path(path).parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(os.access(os.path.join(folder, b), os.X_OK) for b in ("initdb", "pg_ctl", "pg_isready")):
            return Path(folder)
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def _as_pg_user():
    """A function that turns a command into one run as ``PG_USER`` (as is when not root: runuser,
    else su), or None where there is no way."""
    if os.geteuid() != 0:
        return lambda argv: argv
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        return None
    if shutil.which("runuser"):
        return lambda argv: ["runuser", "-u", PG_USER, "--", *argv]
    if shutil.which("su"):
        return lambda argv: ["su", PG_USER, "-s", "/bin/sh", "-c", shlex.join(argv)]
    return None


class PostgresCluster:
    """A PostgreSQL cluster of the test's own, for tests that stop, crash and restart their database.

    ``initdb`` (trust authentication, superuser ``postgres``, no fsync) into a fresh
    ``/tmp/orch-pg-*`` directory owned by the ``postgres`` OS user; the server listens on
    127.0.0.1 on a free port, keeps its unix socket in that directory and logs to
    ``<directory>/server.log``. Made stopped: call :meth:`start`. Measured here (PostgreSQL 15):
    initdb about 1 s, start 0.15 s, stop 0.1 s, kill 0.05 s, start after a kill (crash
    recovery) 0.15 s. ``with PostgresCluster() as pg:`` starts it and closes it afterwards."""

    def __init__(self, port: int | None = None, bin_dir: Path | None = None):
        self.bin = bin_dir or pg_bin_dir()
        as_pg_user = _as_pg_user()
        if self.bin is None or as_pg_user is None:
            raise RuntimeError(f"cannot run a PostgreSQL cluster here (bin dir {self.bin}, no runuser or su to "
                               f"run it as {PG_USER!r})")
        self.as_pg_user = as_pg_user
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(dir="/tmp", prefix="orch-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._n_databases = 0
        try:
            if os.geteuid() == 0:
                entry = pwd.getpwnam(PG_USER)
                os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._run("initdb", "-D", str(self.data), "--auth=trust", "--no-sync", "-U", "postgres",
                      "--encoding=UTF8", "--locale=C", timeout=120)
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write("\n# orch tests (tests/servers.py)\n"
                           f"port = {self.port}\n"
                           "listen_addresses = '127.0.0.1'\n"
                           f"unix_socket_directories = '{self.root}'\n"
                           # a commit is in the WAL (the OS's cache: no fsync) when it returns, so it
                           # survives kill(): no synchronous_commit = off here
                           "fsync = off\nfull_page_writes = off\n"
                           "max_connections = 100\nshared_buffers = 32MB\n")
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _run(self, binary: str, *args: str, timeout: float = 60, check: bool = True):
        """``binary`` of the cluster's PostgreSQL, as the ``postgres`` OS user."""
        proc = subprocess.run(self.as_pg_user([str(self.bin / binary), *args]), cwd=self.root, capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "LC_ALL": "C"})
        if check and proc.returncode != 0:
            raise AssertionError(f"{binary} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
                                 f"\n--- server log ---\n{_tail(self.log)}")
        return proc

    # -- state --
    def postmaster_pid(self) -> int | None:
        """The pid in ``postmaster.pid``, if that file exists (it may be stale after a crash)."""
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        """Whether the postmaster is alive."""
        pid = self.postmaster_pid()
        return pid is not None and _alive(pid)

    def processes(self) -> list[int]:
        """Pids of the live processes of this cluster: those working in its directory (a postmaster
        and its children work in the data directory)."""
        root, pids = str(self.root), []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if (cwd == root or cwd.startswith(root + "/")) and _alive(int(entry)):
                pids.append(int(entry))
        return pids

    def ready(self) -> bool:
        """Whether the server accepts connections (``pg_isready``)."""
        try:
            proc = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                                   "-U", "postgres", "-t", "2"], capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    # -- life --
    def start(self, timeout: float = 60) -> PostgresCluster:
        """Starts the server (recovering after a crash) and waits until it accepts connections."""
        proc = self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(int(timeout)),
                         timeout=timeout + 30, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"PostgreSQL cluster on port {self.port} did not start ({proc.returncode}):\n"
                                 f"{proc.stdout}{proc.stderr}\n--- server log ---\n{_tail(self.log)}")
        try:
            wait_for(self.ready, timeout, what=f"PostgreSQL on port {self.port} to accept connections")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- server log ---\n{_tail(self.log)}") from None
        return self

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """``pg_ctl stop -m mode``: ``smart`` waits for clients, ``fast`` disconnects them, ``immediate``
        quits without a checkpoint (the next start recovers). Waits until its processes are gone."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", str(int(timeout)),
                  timeout=timeout + 30)
        wait_for(lambda: not self.processes(), 30, what=f"the processes of PostgreSQL on port {self.port} to exit")

    def kill(self, timeout: float = 30) -> None:
        """A crash: SIGKILL to the postmaster, then to whatever of its children is left, and waits until
        all are gone. The next :meth:`start` runs crash recovery."""
        pid = self.postmaster_pid()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while pids := self.processes():
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"processes of PostgreSQL on port {self.port} survive SIGKILL: {pids}")
            time.sleep(0.05)
        # The dead postmaster is a zombie until init reaps it (about 2 s here), and a new postmaster
        # takes a zombie's pid in its lock files for a live server. Nothing of the cluster runs now:
        # the lock files are stale, as after a crash of the machine.
        for lock in (self.data / "postmaster.pid", self.root / f".s.PGSQL.{self.port}.lock"):
            lock.unlink(missing_ok=True)

    def restart(self, mode: str = "fast") -> PostgresCluster:
        """:meth:`stop` (if running) then :meth:`start`."""
        if self.running:
            self.stop(mode)
        return self.start()

    def close(self) -> None:
        """Stops the server (kills it if a stop fails) and removes its directory. Idempotent."""
        if not self.root.exists():
            return
        try:
            if self.running:
                self.stop("immediate", timeout=30)
        except (AssertionError, subprocess.TimeoutExpired):
            pass
        finally:
            self.kill()
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self if self.running else self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- databases --
    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` (superuser ``postgres``, no password)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (a unique name unless given); returns its URL."""
        import sqlalchemy

        self._n_databases += 1
        name = name or f"orch_test_{os.getpid()}_{self._n_databases}_{os.urandom(3).hex()}"
        engine = sqlalchemy.create_engine(self.url(), isolation_level="AUTOCOMMIT",
                                          poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    def __repr__(self) -> str:
        return f"PostgresCluster(port={self.port}, root={str(self.root)!r}, running={self.running})"


def postgres_cluster(start: bool = True) -> PostgresCluster:
    """A :class:`PostgresCluster` (started unless ``start=False``; the caller closes it), or
    :func:`helpers.unavailable` (skip, or fail under ORCH_REQUIRE_SERVICES=1) where PostgreSQL's
    binaries, runuser or the ``postgres`` user are missing."""
    if pg_bin_dir() is None:
        unavailable("no PostgreSQL binaries (initdb, pg_ctl, pg_isready) to run a cluster of the test's own")
    if _as_pg_user() is None:
        unavailable(f"running as root without runuser/su or an OS user {PG_USER!r}: PostgreSQL refuses to run as root")
    cluster = PostgresCluster()
    if start:
        try:
            cluster.start()
        except BaseException:
            cluster.close()
            raise
    return cluster


# ---- MLflow ----------------------------------------------------------------------------------------
class MlflowServer:
    """A real ``mlflow server`` subprocess that a test starts, kills and starts again on the same port.

    Its own process group (``kill`` and ``stop`` reach the uvicorn workers too); artifacts are
    served from ``<root>/artifacts`` and its output goes to ``<root>/server.log`` (appended
    across starts). Measured here (mlflow 3.17, SQLite backend): a start takes 9 to 10 s
    (the first, which creates the tables, and one after a kill alike; longer on a busy machine),
    a kill 0.1 s, a stop about 1 s. ``with MlflowServer(...)
    as server:`` starts it and stops it afterwards."""

    def __init__(self, backend_store_uri: str, root: Path | str, port: int | None = None):
        self.backend_store_uri = backend_store_uri
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts = self.root / "artifacts"
        self.log = self.root / "server.log"
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server process is alive (it may not answer yet)."""
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """Whether ``/health`` answers 200."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def answers(self) -> bool:
        """Whether anything accepts a connection on the port."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                return True
        except OSError:
            return False

    def processes(self) -> list[int]:
        """Pids of the live processes of the server's group."""
        return live_in_group(self.proc.pid, wait=0) if self.proc is not None else []

    def _launch(self) -> subprocess.Popen:
        self.starts += 1
        with open(self.log, "a") as log:
            log.write(f"\n=== orch tests: start {self.starts} on port {self.port} ===\n")
            log.flush()
            return subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
                 "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1"], cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, timeout: float = 120) -> MlflowServer:
        """Starts the server on its port and waits until ``/health`` answers. A port still held by a
        server just killed is waited for; a server that exits before it answers (the port was
        taken after all) is started again, until ``timeout``."""
        if self.running:
            raise RuntimeError(f"mlflow server on port {self.port} is already running")
        deadline = time.monotonic() + timeout
        while self.answers() and time.monotonic() < deadline:
            time.sleep(0.2)
        while True:
            self.proc = self._launch()
            while self.proc.poll() is None and not self.healthy() and time.monotonic() < deadline:
                time.sleep(0.25)
            if self.proc.poll() is None and self.healthy():
                return self
            if self.proc.poll() is None or time.monotonic() >= deadline:
                self._end(signal.SIGKILL)
                raise AssertionError(f"mlflow server on port {self.port} did not start within {timeout:g} s:\n"
                                     f"{_tail(self.log)}")
            time.sleep(0.5)  # it exited: the port, most likely; try again

    def _end(self, sig: int, timeout: float = 20) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=timeout)
        left = live_in_group(proc.pid, wait=timeout)
        for pid in left:  # a worker that ignored SIGTERM
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        live_in_group(proc.pid, wait=timeout)

    def kill(self, timeout: float = 30) -> None:
        """A crash: SIGKILL to the server's whole process group; waits until the port no longer answers."""
        self._end(signal.SIGKILL)
        wait_for(lambda: not self.answers(), timeout, what=f"port {self.port} to stop answering")

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``timeout`` seconds."""
        self._end(signal.SIGTERM, timeout)

    def __enter__(self) -> MlflowServer:
        return self if self.running else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MlflowServer(url={self.url!r}, running={self.running})"

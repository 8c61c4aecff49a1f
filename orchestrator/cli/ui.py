"""``orch ui``: the MLflow UI on the project's store, and the link to a study's trials."""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import webbrowser
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import click

from orchestrator import schema
from orchestrator.cli.options import is_file
from orchestrator.errors import UsageError
from orchestrator.secrets import describe, redact_url
from orchestrator.spec.files import load_yaml
from orchestrator.spec.study import parsed_study
from orchestrator.storage import record
from orchestrator.storage.urls import default_storage_url, sqlite_path
from orchestrator.tracking import client
from orchestrator.tracking.views import save_study_view, study_url


@click.command()
@click.argument("target", metavar="[STUDY]", required=False)
@click.option("--tracking-uri", default=None, help="Store to browse (default: SQLite in ./mlruns).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port; the URL printed says which).")
@click.option("--open", "open_browser", is_flag=True, help="Open the link in a web browser.")
def ui(target: str | None, tracking_uri: str | None, host: str, port: int, open_browser: bool) -> None:
    """Open the MLflow UI on the project's store (bound to 127.0.0.1 unless told otherwise).

    With STUDY (a name or a study file), also print the link to its trial runs: sorted by the
    study's metric, with the metric, the searched parameters and each trial's state as columns.
    """
    uri = client.resolve_tracking_uri(tracking_uri)
    if target and uri.startswith(("http://", "https://")):
        client.check_reachable(uri)
    experiment = _ui_experiment(target, uri) if target else None
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        parts = urlsplit(uri)  # a link for a browser: no user or password in it
        base = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        click.echo(f"MLflow UI of the tracking server: {redact_url(uri)}", err=True)
        link = _ui_link(base, target, experiment)
        click.echo(link)
        if open_browser:
            webbrowser.open(link)
        return
    port = _free_port(host, port)
    # the store's URL (and its password) goes in the environment, which `mlflow ui` reads for
    # --backend-store-uri: a command line is readable by every user of the machine (ps, /proc)
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri}
    if sqlite_path(uri):
        artifacts = Path(sqlite_path(uri)).parent / "artifacts"
        env["MLFLOW_DEFAULT_ARTIFACT_ROOT"] = artifacts.resolve().as_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port)]
    base = f"http://{host}:{port}"
    click.echo(f"MLflow UI on {base}", err=True)
    if not _is_loopback(host):
        click.echo(f"warning: the MLflow UI has no authentication: anyone who can reach {host}:{port} can read "
                   "and change the runs (bind 127.0.0.1, the default, and reach it through an SSH tunnel)", err=True)
    server = subprocess.Popen(cmd, stdout=sys.stderr, env=env)  # stdout holds only the link: scripts read it

    def stop(signum, frame):  # SIGTERM to orch alone (a supervisor): the server goes with it
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        link = _ui_link(base, target, experiment)
        if target:
            click.echo(link)
        if open_browser:
            deadline = time.time() + 120
            while time.time() < deadline and server.poll() is None:
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=2).close()
                    break
                except OSError:
                    time.sleep(0.5)
            webbrowser.open(link)
        code = server.wait()
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except SystemExit as exc:
        code = exc.code
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    sys.exit(code)


def _ui_experiment(target: str, uri: str) -> str:
    """The MLflow experiment id of study ``target`` (a name or a study file) in the store ``uri``."""
    name, spec = target, None
    if is_file(target):
        spec = parsed_study(*load_yaml(target))  # its name and space: no plugin or GPU needed to look
        name = spec.name
    mlf = client.client(uri)
    try:
        exp = mlf.get_experiment_by_name(name)
    except Exception as exc:  # noqa: BLE001 - an unreadable store, a refused login, ...
        raise UsageError(f"cannot read the MLflow store {redact_url(uri)}: {describe(exc)}") from None
    if exp is None:
        known = ", ".join(sorted(e.name for e in mlf.search_experiments() if e.name != "Default")) or "none"
        raise UsageError(f"no study {name!r} in the MLflow store {redact_url(uri)}; its studies: {known}")
    if schema.VIEW_TAG_PREFIX + schema.VIEW_KEY not in exp.tags:  # a study of an older orch: its view, saved now
        if spec is None:  # not in the default storage: the link opens the plain runs table
            spec = record.stored_or_none(default_storage_url(name), name)
        if spec is not None:
            save_study_view(mlf, exp.experiment_id, spec)
    return exp.experiment_id


def _ui_link(base: str, target: str | None, experiment: str | None) -> str:
    if experiment is None:
        return base
    link = study_url(base, experiment)
    click.echo(f"study {target}: {link}", err=True)
    return link


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _free_port(host: str, port: int) -> int:
    """``port`` if it can be bound on ``host`` (a port 0 becomes a free one), else exit 2 saying why."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
            return s.getsockname()[1]
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                         + (" (another program has it: pass another --port, or --port 0 for any free one)"
                            if exc.errno == errno.EADDRINUSE else "")) from None

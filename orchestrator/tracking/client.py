"""MLflow: which store, a client on it, its experiments (runs: :mod:`~orchestrator.tracking.runs`).

Default store: SQLite at ``mlruns/mlflow.db`` under the working directory, artifacts in
``mlruns/artifacts`` (MLflow 3 no longer accepts a plain folder as a tracking store). Everything
goes through :class:`mlflow.MlflowClient` with explicit run ids, so several worker processes can
log to the same parent run without sharing global "active run" state.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from orchestrator import schema
from orchestrator.errors import StoreError
from orchestrator.secrets import describe, redact, redact_url, remember
from orchestrator.storage.locks import init_lock
from orchestrator.storage.urls import SQLITE, connect_args, sqlalchemy_url, sqlite_path

DEFAULT_DIR = "mlruns"


def default_tracking_uri() -> str:
    return f"{SQLITE}{Path(DEFAULT_DIR).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the project's SQLite store under ``mlruns/``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if sqlite_path(uri):
        Path(sqlite_path(uri)).parent.mkdir(parents=True, exist_ok=True)
    elif "://" not in uri:  # a bare path: MLflow 3 wants a database, so put one there
        Path(uri).mkdir(parents=True, exist_ok=True)
        uri = f"{SQLITE}{Path(uri).resolve() / 'mlflow.db'}"
    return uri


def client(uri: str | None = None):
    """An MLflow client on ``uri``; a database store's tables are created (on first use) under a
    lock, so that processes starting at the same instant on a fresh store do not collide.

    A tracking server's user and password in the URI are handed to MLflow the way it documents
    (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``), so that the URI MLflow holds has none.
    """
    import mlflow

    # MLflow's INFO lines (creating and migrating the store's tables) are noise in a run's output,
    # and so are the run links it prints (with a server's URI) each time a run ends
    logging.getLogger("mlflow.store").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)  # it logs, then raises: orch reports
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    uri = _credentials_to_env(resolve_tracking_uri(uri))
    mlf = mlflow.MlflowClient(tracking_uri=uri)
    with init_lock(uri):
        mlf._tracking_client.store  # noqa: B018 - opening the store creates or migrates its tables
    return mlf


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail within ``timeout`` seconds, with one clear :class:`StoreError`, when ``uri`` is a tracking
    server that does not answer (MLflow itself retries for minutes before giving up)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    bare = urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))
    try:
        urllib.request.urlopen(bare.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answers (a proxy without /health, or one that wants credentials): MLflow takes it from here
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StoreError(f"cannot reach the MLflow tracking server {redact_url(uri)}: {redact(str(reason))} "
                         "(is `mlflow server` running there, and is the address right?)") from None


def check_store(uri: str | None, timeout: float = 10.0) -> None:
    """Fail with one clear :class:`StoreError` before anything is written when ``uri`` is a tracking
    store that cannot be used: a server that does not answer, a database that is not there or
    refuses the login. SQLite stores and folders are checked by :mod:`orchestrator.storage.probes`."""
    if not uri:
        return
    if urlsplit(uri).scheme in ("http", "https"):
        check_reachable(uri, timeout)
        return
    if "://" not in uri or sqlite_path(uri) or uri.startswith("file:"):
        return
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(sqlalchemy_url(uri), connect_args=connect_args(uri),
                                         poolclass=sqlalchemy.pool.NullPool)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - no driver, no database, refused login, no answer
        raise StoreError(f"cannot use the MLflow tracking store {redact_url(uri)}: {describe(exc)}") from None


def _credentials_to_env(uri: str) -> str:
    """``uri`` without the user and password of an http(s) URI, which go to MLflow's variables."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not (parts.username or parts.password):
        return uri
    remember(uri)
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


def experiment_id(mlf, name: str) -> str:
    """The id of experiment ``name``, created (with artifacts beside a SQLite store) if needed."""
    exp = mlf.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlf.tracking_uri
    location = None
    if sqlite_path(uri):
        location = (Path(sqlite_path(uri)).parent / "artifacts").resolve().as_uri()
    try:  # model training, so that MLflow's UI opens it on its runs, not in its GenAI mode
        return mlf.create_experiment(name, artifact_location=location,
                                     tags={schema.EXPERIMENT_KIND: schema.MODEL_TRAINING})
    except Exception:  # noqa: BLE001 - another process created it first
        exp = mlf.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def delete_artifacts(mlf, run_id: str, path: str, tracking_uri: str | None = None) -> None:
    """Delete ``path`` (a file or folder) from the artifacts of run ``run_id`` (MLflow's client has no
    call for it: through the run's artifact repository, a served one included)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    get_artifact_repository(mlf.get_run(run_id).info.artifact_uri, tracking_uri).delete_artifacts(path)


def log_params(mlf, run_id: str, params: dict[str, Any]) -> None:
    """Log params in batches (MLflow caps a batch at 100 params)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlf.log_batch(run_id, params=items[i:i + 100])

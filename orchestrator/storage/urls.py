"""Store URLs: which file is behind one, which database dialect, and the URL SQLAlchemy takes.

orch names its stores by URL: ``journal:PATH`` (an Optuna journal file, the default storage),
``sqlite:///PATH``, ``postgresql://...`` (or ``postgres://``), ``mysql://...`` for Optuna; the
same SQLAlchemy URLs, ``http(s)://`` servers or a folder for MLflow.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

JOURNAL = "journal:"
SQLITE = "sqlite:///"


def default_storage_url(name: str) -> str:
    """A journal file under ``mlruns/optuna/``: safe for several processes on one machine."""
    return f"{JOURNAL}{Path('mlruns').resolve() / 'optuna' / f'{name}.journal'}"


def sqlite_path(url: str) -> str | None:
    """The path of a ``sqlite:///PATH`` URL as written (``None`` for any other URL)."""
    return url[len(SQLITE):] if url.startswith(SQLITE) else None


def journal_path(url: str) -> str | None:
    """The path of a ``journal:PATH`` URL as written (``None`` for any other URL)."""
    return url[len(JOURNAL):] if url.startswith(JOURNAL) else None


def file_of(url: str) -> str | None:
    """The local file behind a ``journal:PATH`` or ``sqlite:///PATH`` URL, resolved, else ``None``."""
    if url.startswith(JOURNAL):
        return os.path.realpath(os.path.expanduser(journal_path(url)))
    if url.startswith(SQLITE):
        return os.path.realpath(sqlite_path(url))
    return None


def dialect_of(url: str) -> str:
    """The database dialect of a SQLAlchemy URL (``postgres`` read as ``postgresql``)."""
    dialect = url.split(":", 1)[0].split("+", 1)[0].lower()
    return "postgresql" if dialect == "postgres" else dialect


def sqlalchemy_url(url: str) -> str:
    """``url`` with PostgreSQL's driver made explicit (psycopg 3, which orch installs)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


#: libpq settings orch gives a PostgreSQL connection unless its URL sets them: a server that does
#: not answer (a partition, a host gone) fails a try within seconds, so that the outage window
#: (orchestrator.outages), not TCP's minutes of retransmissions, decides how long a call waits
_PG_TIMEOUTS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                "keepalives_count": 3, "tcp_user_timeout": 30000}


def connect_args(url: str) -> dict:
    """Driver arguments for a connection to ``url`` (its own query parameters win)."""
    if dialect_of(url) != "postgresql":
        return {}
    given = parse_qs(urlsplit(url).query)
    return {k: v for k, v in _PG_TIMEOUTS.items() if k not in given}

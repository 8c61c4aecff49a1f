"""Outages of the stores a study writes to: the Optuna storage and the MLflow tracking store.

A database restart, a tracking server away for minutes, a network partition: a call that meets
a *connection-class* error (refused, reset, the server shutting down or starting up, a name that
does not resolve, a timeout, a 502/503/504 from a proxy) is retried with a bounded exponential
backoff for a *window* (``study.outage_grace``, 10 minutes by default) from the first failure of
the outage. An error that retrying cannot fix (a constraint, a schema, a bad value) is raised at
once. Past the window the call raises :class:`Unreachable`, a
:class:`~orchestrator.errors.ResourceFault`: the running trials end interrupted (no budget used)
and the study stops with one line naming the store, exit status 1; the next run resumes.

An :class:`Outage` watches one store for one process; the stores' proxies
(:mod:`orchestrator.storage.retrying`, :mod:`orchestrator.tracking.retrying`) make every call
through it. Inside :func:`no_wait` (the training loop, the heartbeat thread, the supervisor's
progress display) a call does not wait: it raises :class:`Unavailable` at once, and the caller
keeps what it meant to write (a per-epoch report, a batch of metrics) for its next attempt, so
that training goes on while a store is away.
"""

from __future__ import annotations

import contextlib
import errno
import re
import sys
import threading
import time

from orchestrator.errors import ResourceFault, resource_fault

#: default window, in seconds, during which a store that does not answer is waited for
DEFAULT_WINDOW = 600.0
#: backoff between two tries: doubles from FIRST_DELAY up to MAX_DELAY
FIRST_DELAY, MAX_DELAY = 0.5, 15.0
#: a failed try this recent (seconds) still says the store is away
RECENT = 60.0

_ERRNOS = {getattr(errno, n) for n in ("ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "EHOSTUNREACH", "ENETUNREACH",
                                       "ETIMEDOUT", "EPIPE", "ENETDOWN", "EHOSTDOWN") if hasattr(errno, n)}
#: SQLSTATE codes (PostgreSQL, via psycopg) of a connection that failed or a server going away
_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300", "40001", "40P01")
#: how drivers and HTTP clients word a connection-class error, and how orch says it
_TEXT = [
    (r"connection refused", "connection refused"),
    (r"terminating connection|shutting down|is starting up|in recovery|not yet accepting connections",
     "the server is restarting"),
    (r"server closed the connection|connection reset|connection aborted|remotedisconnected|broken pipe|"
     r"ssl syscall error|eof detected|connection is closed|connection has been closed|connection already closed|"
     r"lost connection|consuming input failed", "the connection was cut"),
    (r"name or service not known|temporary failure in name resolution|nodename nor servname|failed to resolve|"
     r"could not translate host name", "the host name does not resolve"),
    (r"no route to host|network is unreachable|host is unreachable", "the network is unreachable"),
    (r"timed out|timeout expired", "timed out"),
    (r"too many connections|remaining connection slots", "too many connections"),
    (r"error code 50[234]|bad gateway|service unavailable|gateway time-?out", "the server answered 502/503/504"),
    (r"max retries exceeded|could not connect|unable to connect|failed to establish a new connection",
     "no answer"),
    (r"database is locked", "the database is locked"),
]
_TEXT_RE = [(re.compile(p, re.IGNORECASE), what) for p, what in _TEXT]


class Unavailable(Exception):
    """A store did not answer a call made inside :func:`no_wait`: keep the write and try again later."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what} does not answer ({reason})")
        self.reason = reason


class Unreachable(ResourceFault):
    """A store did not answer for the whole outage window: the study stops, its trials interrupted."""


def connection_problem(exc: BaseException | None) -> str | None:
    """What in ``exc`` (or what caused it) is a connection-class error, in a few words, or ``None``
    (an error that retrying cannot fix: a constraint, a schema, a bad value, a full disk)."""
    if exc is None or resource_fault(exc):
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Unavailable):
            return exc.reason
        if isinstance(exc, OSError) and exc.errno in _ERRNOS:
            return "connection refused" if exc.errno == errno.ECONNREFUSED else (exc.strerror or "connection error")
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return "connection error" if isinstance(exc, ConnectionError) else "timed out"
        state = getattr(exc, "sqlstate", None) or getattr(getattr(exc, "orig", None), "sqlstate", None)
        if isinstance(state, str) and state.startswith(_SQLSTATES):
            return "the server is restarting" if state.startswith("57P") else "the connection failed"
        if getattr(exc, "connection_invalidated", False):
            return "the connection was cut"
        text = str(exc)
        for pattern, what in _TEXT_RE:
            if pattern.search(text):
                return what
        exc = exc.__cause__ or exc.__context__
    return None


def unavailable_in(exc: BaseException | None) -> str | None:
    """The reason of an :class:`Unavailable` in ``exc`` or what caused it (a store orch was calling
    did not answer in time), or ``None``: unlike :func:`connection_problem`, never an error of the
    user's own code that merely reads like one (a data loader that timed out)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Unavailable):
            return exc.reason
        exc = exc.__cause__ or exc.__context__
    return None


_local = threading.local()


@contextlib.contextmanager
def no_wait():
    """Calls made in this thread inside the block do not wait for a store: :class:`Unavailable`."""
    before = getattr(_local, "no_wait", False)
    _local.no_wait = True
    try:
        yield
    finally:
        _local.no_wait = before


def waiting() -> bool:
    """Whether calls in this thread wait for a store that is away (outside :func:`no_wait`)."""
    return not getattr(_local, "no_wait", False)


def _say(line: str) -> None:
    print(f"orch: {line}", file=sys.stderr, flush=True)


class Outage:
    """One store's outages, as one process sees them (shared by its threads).

    ``what`` names the store in messages (password hidden); ``window``: seconds a store that does
    not answer is waited for; ``stop()``: true once the process is asked to stop (a wait ends then).
    """

    def __init__(self, what: str, window: float = DEFAULT_WINDOW, *, stop=lambda: False, say=_say):
        self.what, self.window, self._stop, self._say = what, float(window), stop, say
        self._lock = threading.Lock()
        self.since: float | None = None  # monotonic time of the current outage's first failure
        self.reason = ""
        self.expired = False  # the window passed: every later call fails at once
        self._delay = FIRST_DELAY
        self._retry_at = 0.0
        self.recovered_at: float | None = None  # when the store last answered again after an outage
        self.failed_at = 0.0  # the last failed try

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, retried while the store is away (up to the window)."""
        while True:
            self._check()
            if not waiting() and self.since is not None and time.monotonic() < self._retry_at:
                raise Unavailable(self.what, self.reason)  # backing off: no try before then
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                reason = connection_problem(exc)
                if reason is None:
                    raise
                delay = self._failed(reason)
                if not waiting() or self._stop():
                    raise Unavailable(self.what, reason) from None
                time.sleep(delay)
                continue
            self._answered()
            return result

    def check(self) -> None:
        """Raise :class:`Unreachable` once the current outage has lasted longer than the window (and a
        try failed lately: a store that may have come back unnoticed is tried again first)."""
        self._check()
        now = time.monotonic()
        with self._lock:
            if self.since is not None and now - self.since > self.window and now - self.failed_at < RECENT:
                self.expired = True
        self._check()

    def quiet_for(self, seconds: float) -> bool:
        """Whether the store has answered without a break for the last ``seconds``."""
        with self._lock:
            if self.since is not None:
                return False
            return self.recovered_at is None or time.monotonic() - self.recovered_at >= seconds

    def _check(self) -> None:
        if self.expired:
            raise Unreachable(f"{self.what} did not answer for {self.window:g} s ({self.reason})")

    def _failed(self, reason: str) -> float:
        """Record a failed call; the delay before the next try."""
        now = time.monotonic()
        with self._lock:
            first = self.since is None
            if first:
                self.since, self._delay = now, FIRST_DELAY
            self.reason, self.failed_at = reason, now
            delay = min(self._delay, MAX_DELAY, max(self.since + self.window - now, 0.0) + 0.01)
            self._delay = min(self._delay * 2, MAX_DELAY)
            self._retry_at = now + delay
            if now - self.since > self.window:
                self.expired = True
        if first:
            self._say(f"{self.what} does not answer ({reason}); waiting up to {self.window:g} s for it")
        self._check()
        return delay

    def _answered(self) -> None:
        if self.since is None:
            return
        with self._lock:
            since, self.since = self.since, None
            if since is None:
                return
            self.recovered_at = time.monotonic()
        self._say(f"{self.what} answers again, after {self.recovered_at - since:.0f} s")


_watched: list[Outage] = []


def watch(*outages: Outage) -> None:
    """Have :func:`check_all` check these outages (a worker's storage and tracking store)."""
    _watched.extend(outages)


def check_all() -> None:
    """Raise :class:`Unreachable` if a watched store has been away for longer than its window
    (checked at every training step: a trial that cannot write stops soon after the window)."""
    for outage in _watched:
        if outage.since is not None or outage.expired:
            outage.check()

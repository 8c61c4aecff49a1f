"""Stopping: SIGINT and SIGTERM (Ctrl-C, a scheduler's preemption), and workers that outlive nothing.

In a worker process a stop signal (SIGINT, SIGTERM, SIGHUP) only raises a flag; the running trial stops at its next step
boundary (:func:`orchestrator.training.callbacks.interruption`), ends *interrupted* in Optuna and
MLflow (retried with the same
parameters, from its last checkpoint, using no budget), and the worker exits with 128 + the
signal (130 for SIGINT, 143 for SIGTERM). A worker also stops when its coordinator dies, even
by ``kill -9``: Linux's parent-death signal delivers it a SIGTERM, and a watchdog thread notices
the new parent on any system; if the trial does not reach a step boundary within
:data:`GRACE` seconds it exits anyway, and its trial is found lost by the next run.

In the coordinator (``study run``, ``study worker``) a stop signal raises
:class:`~orchestrator.errors.Stopped`, which
stops the workers the same way and exits with the same code.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

from orchestrator.errors import Stopped

#: seconds a stopping worker gets to reach a step boundary and record its trial
GRACE = float(os.environ.get("ORCH_STOP_GRACE", "60"))
_PR_SET_PDEATHSIG = 1
_stop: int | None = None  # the signal that asked this process to stop


class TrialInterrupted(Exception):
    """Raised at a step boundary of a trial whose worker was asked to stop."""


def requested() -> int | None:
    """The signal that asked this worker to stop, if any."""
    return _stop


def request(signum: int, frame=None) -> None:
    global _stop
    if _stop is None:
        _stop = signum


def exit_code() -> int:
    return 128 + (_stop or signal.SIGTERM)


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def install_worker_handlers(parent: int) -> None:
    """Stop signals raise the flag; the worker also stops when its parent (pid ``parent``, the
    coordinator that started it) dies, even before this process got this far."""
    for signum in SIGNALS:
        signal.signal(signum, request)
    try:  # Linux: the kernel sends SIGTERM when the parent dies
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the request took effect
        request(signal.SIGTERM)
    threading.Thread(target=_watch_parent, args=(parent,), name="orch-parent-watch", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent and _stop is None:
        time.sleep(1.0)
    if os.getppid() != parent:
        request(signal.SIGTERM)
    # whatever asked it to stop, a worker that cannot reach a step boundary in time goes anyway
    time.sleep(GRACE)
    os._exit(exit_code())


def install_coordinator_handlers() -> dict:
    """Stop signals raise :class:`Stopped` in the coordinator; returns the previous handlers."""
    def stop(signum, frame):
        ignore()  # a second signal must not cut the clean-up short
        raise Stopped(signum)

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for signum in previous:
        signal.signal(signum, stop)
    return previous


def ignore() -> None:
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def restore(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)

"""Who runs a trial: worker ids (``host~tag:pid``), recorded as a trial's owner, and whether one is alive.

A trial's owner is the worker process that claimed it (:data:`orchestrator.schema.WORKER`). On
this machine a dead owner is a pid that no longer exists; a worker of another machine can only be
found dead by its heartbeats (:mod:`orchestrator.execution.claims`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket


def worker_id(pid: int | None = None) -> str:
    """``MACHINE:PID`` of a worker process of this machine (see :func:`machine`)."""
    return f"{machine()}:{pid or os.getpid()}"


@functools.lru_cache(maxsize=1)
def machine() -> str:
    """This machine as worker ids name it: the host name, plus a tag of the kernel's boot and the pid
    namespace, so that two containers that share a host name are not taken for one machine (whose
    dead pids would make the other's trials look abandoned)."""
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        with contextlib.suppress(OSError):
            parts.append(open(path).read().strip() if path.endswith("boot_id") else str(os.stat(path).st_ino))
    tag = hashlib.sha1("/".join(parts).encode()).hexdigest()[:6] if parts else "-"
    return f"{socket.gethostname()}~{tag}"


def split(owner: str) -> tuple[str, str]:
    """``(machine, pid)`` of a worker id (``("", "")`` for none)."""
    owner_machine, _, pid = owner.rpartition(":")
    return owner_machine, pid


def alive_here(owner: str) -> bool:
    """Whether ``owner`` is a worker of this machine whose process still exists."""
    owner_machine, pid = split(owner)
    return owner_machine == machine() and pid.isdigit() and pid_alive(int(pid))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

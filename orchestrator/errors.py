"""orch's errors: one hierarchy, caught once by the command line (:mod:`orchestrator.cli`).

Every error orch raises on purpose derives from :class:`OrchError` and carries the exit status of
the command it ends. Their messages say what went wrong and what to do, naming the file, key,
plugin or store; the command line prints them on one line, passwords hidden.

=========================  ====  =====================================================================
error                      exit  when
=========================  ====  =====================================================================
:class:`UsageError`        2     bad input: an option, a name, a study that is not there
:class:`SpecError`         2     a run or study file (or ``--set``) that is not valid: file, line, key
:class:`PluginError`       2     an unknown or broken plugin was asked for
:class:`IncompatibleError` 2     a run's dataset and module do not fit each other
:class:`StoreError`        2     a storage, lock, journal or tracking store found unusable before work
:class:`ResourceFault`     1     a fault that retrying cannot fix, met mid-study (a full disk)
:class:`Stopped`           128+n the coordinator was stopped by signal n (a ``BaseException``)
=========================  ====  =====================================================================
"""

from __future__ import annotations

import errno
import signal


class OrchError(Exception):
    """An error whose message is meant for the user, as is; ``exit_code`` ends the command."""

    exit_code = 1


class UsageError(OrchError):
    """Bad input: nothing was written (exit status 2)."""

    exit_code = 2


class SpecError(UsageError, ValueError):
    """A run or study file is invalid; the message says where and what to do.

    ``key`` is the dotted setting at fault (when there is one) and ``detail`` the message without
    its ``file:line`` prefix.
    """

    def __init__(self, message: str, key: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.key = key
        self.detail = detail or message


class PluginError(UsageError, LookupError):
    """An unknown or broken plugin was requested."""


class IncompatibleError(UsageError, ValueError):
    """The dataset and the module of a run do not fit each other."""


class StoreError(UsageError):
    """A store orch needs cannot be used as it is: an Optuna storage or MLflow tracking store that
    does not answer or does not hold the study, a damaged journal, a storage without a shared
    lock, a folder that cannot be written. Found before any trial runs (exit status 2)."""


class ResourceFault(OrchError):
    """A fault that retrying cannot fix (disk full, read-only or unwritable store), met while the
    study runs: its running trials end interrupted and the study stops (exit status 1)."""

    exit_code = 1


class Stopped(BaseException):
    """The coordinator was asked to stop by ``signum`` (a BaseException, like KeyboardInterrupt, so
    that no ``except Exception`` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


#: errno names that mean a resource fault, and how to say it
_RESOURCE_ERRNOS = {"ENOSPC": "no space left on the device", "EDQUOT": "disk quota exceeded",
                    "EROFS": "read-only file system", "EFBIG": "file too large (a file-size limit)",
                    "EACCES": "permission denied"}
#: the same faults as database drivers word them
_RESOURCE_TEXT = {"database or disk is full": "disk full (database)", "disk I/O error": "disk I/O error",
                  "attempt to write a readonly database": "read-only database",
                  "No space left on device": "no space left on the device"}


def resource_fault(exc: BaseException | None) -> str | None:
    """What in ``exc`` (or what caused it) is a fault that retrying cannot fix, or ``None``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ResourceFault):
            return str(exc)
        code = getattr(exc, "errno", None)
        for name, what in _RESOURCE_ERRNOS.items():
            if code == getattr(errno, name, None):
                where = getattr(exc, "filename", None)
                return f"{what}{f' ({where})' if where else ''}"
        text = str(exc)
        for needle, what in _RESOURCE_TEXT.items():
            if needle in text:
                return what
        exc = exc.__cause__ or exc.__context__
    return None

"""Files orch writes where someone else may write too: a shared store folder, the checkpoint store,
the user cache.

Every such file is created under a fresh name of its own, exclusively (``O_CREAT | O_EXCL |
O_NOFOLLOW``: a name that exists, as a file or as a symbolic link, even one to nothing, is never
opened), and then renamed into place, which replaces a link planted at the final name instead of
writing through it. Files read back from such folders are opened with :func:`open_regular`, which
refuses a link and anything but a regular file (a FIFO would block, a device never end), and a
folder is removed with :func:`remove`, which never follows a link out of it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

#: what a new file is given: its bytes, or a function that writes them to the open binary file
Data = Union[bytes, Callable[[BinaryIO], Any]]

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


class NotRegular(OSError):
    """A path that had to be a regular file (not a link) is something else."""


def write_new(folder: str | os.PathLike, prefix: str, data: Data, suffix: str = "", mode: int = 0o666,
              sync: bool = False) -> Path:
    """A new file ``folder/prefix<random>suffix`` holding ``data``, created exclusively; returns its path.

    ``mode`` is masked by the umask, as for any file the user creates; ``sync`` flushes it to disk
    before returning. On an error (a full disk) nothing is left behind.
    """
    folder = Path(folder)
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(path, _CREATE, mode)
            break
        except FileExistsError:  # taken (planted, or by chance): another name
            continue
    else:
        raise FileExistsError(errno.EEXIST, f"no free name {prefix}...{suffix}", str(folder))
    try:
        with os.fdopen(fd, "wb") as out:
            if callable(data):
                data(out)
            else:
                out.write(data)
            if sync:
                out.flush()
                os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return path


def replace(folder: str | os.PathLike, name: str, data: Data, mode: int = 0o666, sync: bool = False) -> Path:
    """``folder/name`` replaced, atomically, by a new file holding ``data`` (written under a fresh
    name first, then renamed: readers see the old file or the new one, whole)."""
    target = Path(folder) / name
    tmp = write_new(folder, f".{name}.", data, suffix=".part", mode=mode, sync=sync)
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return target


def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY, own: bool = False) -> int:
    """A file descriptor of ``path`` opened with ``flags``, refused (:class:`NotRegular`) unless it is
    a regular file, not a link; ``own``: also unless it belongs to this user and no one else may
    write to it. Never blocks on a FIFO."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(errno.EINVAL, f"not a regular file: {kind(st)}", str(path))
        if own and (st.st_uid != os.getuid() or st.st_mode & 0o022):
            raise NotRegular(errno.EPERM, "another user may have written it", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike, own: bool = False) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`)."""
    with os.fdopen(open_regular(path, own=own), "rb") as f:
        return f.read()


def kind(st: os.stat_result) -> str:
    """What a file of this ``stat`` is, in words ("a FIFO", "a folder", ...)."""
    for test, words in _KINDS:
        if test(st.st_mode):
            return words
    return "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a regular file"


def not_regular(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is there but is neither a regular file nor a link to one (``"a
    character device"``, ``"a symbolic link to nothing"``...); ``None`` when it is one, or absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "a symbolic link to nothing" if os.path.islink(path) else None
    except OSError as exc:  # a loop of links, a file where a folder should be, no permission
        return f"unusable ({exc.strerror or exc})"
    if stat.S_ISREG(st.st_mode):
        return None
    return kind(st) + (" (through a symbolic link)" if os.path.islink(path) else "")


def remove(path: str | os.PathLike) -> None:
    """Remove the folder ``path`` and what it holds, following no link: a link (or a file) planted
    at its name is itself removed, and links inside are removed, not followed. Errors are ignored."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)  # on Linux, fd-based: it never follows a link
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)

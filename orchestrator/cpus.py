"""The CPU cores this process may use: what worker slots and torch's threads are planned from.

``os.cpu_count()`` counts every core of the machine, not those a Slurm job (``--cpus-per-task``,
a cpuset) or a container (a CFS quota in its cgroup) may use: torch then starts a thread per core
and the threads fight over the few cores there are. The usable count is the smallest of

- the affinity mask (``taskset``, a cpuset, Slurm's binding): ``os.sched_getaffinity``;
- the cgroup CPU quotas of the process's own cgroup and of every cgroup above it (cgroup v2
  ``cpu.max``, cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``): quota/period, rounded up;

and ``ORCH_CPUS`` (a positive whole number) overrides them all. A file that is missing or cannot
be read is skipped, never an error. No heavy import: ``orch --help`` paths may load this module.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import UsageError

#: the environment variable that overrides the count
OVERRIDE = "ORCH_CPUS"


@dataclass(frozen=True)
class Cpus:
    """How many cores this process may use, and where the figure came from (a short phrase)."""

    count: int
    source: str

    def __str__(self) -> str:
        return f"{self.count} ({self.source})"


def usable_cpus(environ=os.environ, root: str | os.PathLike = "/") -> Cpus:
    """The cores this process may use (``root``: where ``/proc`` and ``/sys`` are, for tests)."""
    given = environ.get(OVERRIDE)
    if given is not None and given.strip():
        try:
            n = int(given.strip())
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"{OVERRIDE}={given!r}: expected a positive whole number of CPU cores, e.g. "
                             f"{OVERRIDE}=4 (or unset it to count the usable ones)")
        return Cpus(n, f"{OVERRIDE}={n}")
    total = os.cpu_count() or 1
    try:
        affinity = len(os.sched_getaffinity(0)) or total
    except (AttributeError, OSError):  # not on Linux
        affinity = total
    quota = _smallest_quota(Path(root))
    if quota is not None and quota[0] < affinity:
        return Cpus(*quota)
    if affinity < total:
        return Cpus(affinity, f"affinity mask (taskset/cpuset): {affinity} of {total} cores")
    if quota is not None and quota[0] == affinity:
        return Cpus(*quota)
    return Cpus(total, f"os.cpu_count(): all {total} cores, no affinity mask or cgroup CPU quota")


def torch_threads(cpus: Cpus | None = None, environ=os.environ) -> int:
    """The intra-op threads of torch in one process: the user's ``OMP_NUM_THREADS`` when it is a
    positive whole number, else the usable cores (``cpus``, counted when not given)."""
    theirs = environ.get("OMP_NUM_THREADS", "").strip()
    if theirs.isdigit() and int(theirs) > 0:
        return int(theirs)
    return (cpus or usable_cpus(environ)).count


def limit_threads(environ=os.environ) -> int:
    """Before torch is imported: ``OMP_NUM_THREADS`` set to the usable cores unless the user set it
    (theirs is kept); returns the count to give ``torch.set_num_threads``."""
    threads = torch_threads(environ=environ)
    if not environ.get("OMP_NUM_THREADS", "").strip():
        environ["OMP_NUM_THREADS"] = str(threads)
    return threads


# ---- cgroups ------------------------------------------------------------------------------------

def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _smallest_quota(root: Path) -> tuple[int, str] | None:
    """The smallest CPU quota over this process's cgroups and their ancestors, as (cores, phrase)."""
    best = None
    for version, folder, top in _cgroup_folders(root):
        for where in _up_to(folder, top):
            found = _quota(version, where)
            if found is None:
                continue
            quota, period = found
            n = max(1, math.ceil(quota / period))
            if best is None or n < best[0]:
                shown = "/" / where.relative_to(root)
                best = (n, f"cgroup {version} CPU quota {quota}/{period} → {n}, set in {shown}")
    return best


def _quota(version: str, folder: Path) -> tuple[int, int] | None:
    """The quota and period set in one cgroup folder, or None (no limit, or nothing readable)."""
    try:
        if version == "v2":
            text = _read(folder / "cpu.max")
            if text is None:
                return None
            fields = text.split()
            if len(fields) < 1 or fields[0] == "max":
                return None
            quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100_000
        else:
            quota_text, period_text = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota_text is None or period_text is None:
                return None
            quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    return (quota, period) if quota > 0 and period > 0 else None


def _up_to(folder: Path, top: Path) -> list[Path]:
    """``folder`` and the folders above it, up to ``top`` (its mount point) included."""
    out = [folder]
    while folder != top and folder != folder.parent:
        folder = folder.parent
        out.append(folder)
    return out


def _cgroup_folders(root: Path) -> list[tuple[str, Path, Path]]:
    """``(version, the process's cgroup folder, the hierarchy's mount point)`` for the cgroup v2
    hierarchy and the v1 hierarchy holding the ``cpu`` controller, where there are such."""
    text = _read(root / "proc" / "self" / "cgroup")
    if text is None:
        return []
    mounts = _mounts(root)
    out = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            version = "v2"
            candidates = mounts.get("v2") or [("/", root / "sys" / "fs" / "cgroup")]
        elif "cpu" in controllers.split(","):
            version = "v1"
            candidates = mounts.get("v1") or [("/", root / "sys" / "fs" / "cgroup" / name)
                                              for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
        else:
            continue
        for mount_root, mount_point in candidates:
            if not mount_point.is_dir():
                continue
            out.append((version, _inside(path, mount_root, mount_point), mount_point))
            break
    return out


def _inside(path: str, mount_root: str, mount_point: Path) -> Path:
    """The folder of cgroup ``path`` under a mount of the hierarchy's ``mount_root`` at
    ``mount_point``; the mount point itself where the path is not under what is mounted."""
    relative = os.path.relpath(path, mount_root) if path.startswith("/") else ".."
    if relative == "." or relative.startswith(".."):
        return mount_point
    folder = mount_point / relative
    return folder if folder.is_dir() else mount_point


def _mounts(root: Path) -> dict[str, list[tuple[str, Path]]]:
    """The cgroup mounts in ``/proc/self/mountinfo``: version -> [(root in the hierarchy, mount point)]."""
    text = _read(root / "proc" / "self" / "mountinfo")
    found: dict[str, list[tuple[str, Path]]] = {}
    for line in (text or "").splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        mount_root, point = (_unescape(f) for f in fields[3:5])
        where = root / point.lstrip("/")
        if tail[0] == "cgroup2":
            found.setdefault("v2", []).append((mount_root, where))
        elif tail[0] == "cgroup" and "cpu" in tail[2].split(","):
            found.setdefault("v1", []).append((mount_root, where))
    return found


def _unescape(field: str) -> str:
    """A mountinfo field with its octal escapes (``\\040`` for a space) undone."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)

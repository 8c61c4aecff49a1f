"""``orch doctor``: the environment on one screen, for a bug report and for the first checks.

Each finding is a row: a section, a name, what was found, and a status. ``fail`` means the main
job (``orch study run studies/ptb.yaml``) cannot run as things are, and the row carries the fix in
one line; ``warn`` is worth knowing but does not stop it (no GPU: the study takes a CPU slot).
Passwords in storage and tracking URLs are never shown.

Its checks import the third-party libraries they read (``packaging``, ``platformdirs`` through the
plugin listing) themselves, so that a broken install is a finding, not a traceback: the one
exception to "function-level imports only of heavy libraries" (``tests/test_architecture.py``).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from orchestrator import __version__, registry
from orchestrator.cpus import OVERRIDE, torch_threads, usable_cpus
from orchestrator.errors import PluginError, StoreError, UsageError
from orchestrator.secrets import describe, redact, redact_url
from orchestrator.storage.urls import default_storage_url, journal_path, sqlalchemy_url, sqlite_path
from orchestrator.tracking.client import check_reachable, default_tracking_uri

#: the distributions shown even when they are fine (every requirement of orch is checked)
SHOWN = ("torch", "pytorch-lightning", "optuna", "mlflow", "sqlalchemy")
#: the plugins the main job needs
MAIN_JOB_PLUGINS = {("datasets", "ptb"), ("cells", "lstm"), ("cells", "diy_lstm"), ("modules", "language_model")}


@dataclass
class Finding:
    section: str
    name: str
    value: str
    status: str = "ok"  # ok | warn | fail
    fix: str | None = None


def _requirements() -> list[Finding]:
    """orch's declared dependencies against what is installed."""
    from packaging.requirements import Requirement  # a broken install is a finding: see collect()

    try:
        required = metadata.requires("orch") or []
    except metadata.PackageNotFoundError:
        return [Finding("packages", "orch", "not installed as a package: its requirements are not checked", "warn",
                        'pip install -e . (in the checkout)')]
    found = []
    for line in required:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (dev, ...)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            found.append(Finding("packages", req.name, "not installed", "fail",
                                 f'pip install "{req.name}{req.specifier}"'))
            continue
        if not req.specifier.contains(version, prereleases=True):
            found.append(Finding("packages", req.name, f"{version} (orch needs {req.specifier})", "fail",
                                 f'pip install "{req.name}{req.specifier}"'))
        elif req.name.lower() in SHOWN:
            found.append(Finding("packages", req.name, version))
    return found


def _torch() -> list[Finding]:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken install is what the doctor is for
        return [Finding("torch", "import", f"{type(exc).__name__}: {exc}", "fail",
                        'reinstall PyTorch: pip install "torch>=2.11,<3" (a CUDA build from pytorch.org for GPUs)')]
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    found = [Finding("torch", "build", f"{torch.__version__} ({build}; cuDNN {cudnn or 'none'})")]
    driver = _driver_version()
    if driver:
        found.append(Finding("torch", "NVIDIA driver", driver))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            found.append(Finding("torch", f"GPU {i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB"))
    else:
        why = "this PyTorch has no CUDA" if not torch.version.cuda else "CUDA sees no GPU"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            why += f" (CUDA_VISIBLE_DEVICES={visible!r})"
        found.append(Finding("torch", "GPUs", f"none: {why}; trials take CPU slots", "warn"))
    return found


def _cpus() -> Finding:
    """The cores orch plans worker slots and torch threads from, and where the figure came from."""
    try:
        cpus = usable_cpus()
    except UsageError as exc:
        return Finding("orch", "usable CPUs", str(exc), "fail", f"set {OVERRIDE} to a positive whole number, or unset "
                       "it to count the cores this process may use")
    value, theirs = str(cpus), os.environ.get("OMP_NUM_THREADS", "").strip()
    if theirs.isdigit() and int(theirs) > 0:
        value += f"; OMP_NUM_THREADS={theirs} is set: orch train gives torch {torch_threads(cpus)} thread(s)"
    return Finding("orch", "usable CPUs", value)


def _driver_version() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def _data() -> list[Finding]:
    """The main job's data, as its dataset plugin finds it (through the registry, like any plugin)."""
    try:
        ptb = registry.get("datasets", "ptb")
    except PluginError as exc:
        return [Finding("data", "ptb", f"not checked: {exc}", "fail", "reinstall orch: pip install -e .")]
    if not callable(getattr(ptb, "data_files", None)):
        where = registry.get_info("datasets", "ptb").distribution
        return [Finding("data", "ptb", f"not checked: the ptb plugin of {where} does not say where its files are "
                        "(no data_files())", "warn")]
    folder, source, bad = ptb().data_files()
    where = f"{folder} (from {source})" if source else f"{folder} (orch's user cache)"
    if not bad:
        return [Finding("data", "ptb", f"{where}: 3 files, checksums verified")]
    if source is None and all(b.endswith("missing") for b in bad):
        return [Finding("data", "ptb", f"{where}: not there yet; downloaded and verified on first use", "warn",
                        "set ORCH_DATA_DIR to a folder whose ptb/ subfolder holds the files, where there is no "
                        "internet")]
    fix = (f"put ptb.train.txt, ptb.valid.txt and ptb.test.txt (Mikolov's split) in {folder}"
           + (", or point ORCH_DATA_DIR elsewhere" if source == "ORCH_DATA_DIR"
              else ", or delete them to download again"))
    return [Finding("data", "ptb", f"{where}: {', '.join(bad)}", "fail", fix)]


def _writable(path: Path) -> str | None:
    """Why a file could not be created or appended to at ``path`` (its folders made as needed), or
    None. Nothing is left behind: an existing file is opened for appending and closed unchanged."""
    if path.is_file():
        try:  # opened as itself: a link there is a finding, never followed to append to its target
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK))
        except OSError as exc:
            return f"cannot write {path}: {exc.strerror or exc}"
        return None
    probe = path.parent
    while not probe.exists():
        if probe == probe.parent:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as exc:
        return f"cannot write in {probe}: {exc.strerror or exc}"
    return None


def _database(url: str) -> str | None:
    """Why the SQLAlchemy database at ``url`` cannot be opened, or None."""
    import sqlalchemy

    args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=args)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any driver's error is the finding
        lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return lines[0] if lines else type(exc).__name__
    return None


def _storage(given: str | None) -> list[Finding]:
    url = given or os.environ.get("ORCH_STORAGE") or default_storage_url("<study>")
    origin = "--storage" if given else "$ORCH_STORAGE" if os.environ.get("ORCH_STORAGE") else "default"
    if journal_path(url) is not None:
        problem, state = _writable(Path(journal_path(url)).expanduser()), "writable"
    elif sqlite_path(url) is not None:
        problem, state = _writable(Path(sqlite_path(url)).expanduser()), "writable"
    else:
        problem, state = _database(sqlalchemy_url(url)), "answers"  # opened as orch opens it (postgres://)
    shown = f"{redact_url(url)} ({origin})"
    if problem:
        return [Finding("storage", "Optuna storage", f"{shown}: {redact(problem)}", "fail",
                        "pass --storage (or set $ORCH_STORAGE) to a storage this machine can write, or fix the one "
                        "named")]
    return [Finding("storage", "Optuna storage", f"{shown}: {state}")]


def _tracking(given: str | None) -> list[Finding]:
    uri = given or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    origin = ("--tracking-uri" if given else "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
              else "default")
    shown = f"{redact_url(uri)} ({origin})"
    if uri.startswith(("http://", "https://")):
        problem, state = None, "reachable"
        try:
            check_reachable(uri, timeout=5)
        except StoreError as exc:
            problem = str(exc)
    elif sqlite_path(uri) is not None:
        problem, state = _writable(Path(sqlite_path(uri)).expanduser()), "writable"
    elif "://" in uri and not uri.startswith("file:"):
        problem, state = _database(uri), "answers"
    else:  # a folder: orch keeps a SQLite store in it
        problem, state = _writable(Path(uri.removeprefix("file://")).expanduser() / "mlflow.db"), "writable"
    if problem:
        return [Finding("tracking", "MLflow tracking", f"{shown}: {redact(problem)}", "fail",
                        "start the tracking server, or pass --tracking-uri (or set $MLFLOW_TRACKING_URI) to one "
                        "that answers")]
    return [Finding("tracking", "MLflow tracking", f"{shown}: {state}")]


def _plugins() -> list[Finding]:
    from orchestrator.registry.listing import listing  # through the user cache: platformdirs, see collect()

    found, plugins = [], listing()
    for p in plugins:
        needed = (p.kind, p.name) in MAIN_JOB_PLUGINS
        if p.status == "ok":
            found.append(Finding("plugins", f"{p.kind[:-1]} {p.name}", f"{p.distribution} {p.version}"))
        else:
            found.append(Finding("plugins", f"{p.kind[:-1]} {p.name}", f"broken: {p.error}",
                                 "fail" if needed else "warn",
                                 f"reinstall {p.distribution}, or see `orch plugins check {p.name}`"))
    missing = sorted(f"{k[:-1]} {n}" for k, n in MAIN_JOB_PLUGINS - {(p.kind, p.name) for p in plugins})
    for name in missing:
        found.append(Finding("plugins", name, "not installed", "fail", "reinstall orch: pip install -e ."))
    return found


def collect(storage: str | None = None, tracking_uri: str | None = None) -> list[Finding]:
    """Every finding, section by section."""
    found = [Finding("orch", "version", f"{__version__} ({Path(__file__).resolve().parent})"),
             Finding("orch", "Python", f"{platform.python_version()} ({sys.executable})"),
             Finding("orch", "platform", f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"),
             _cpus()]
    parts = {"packages": _requirements, "torch": _torch, "data": _data, "storage": lambda: _storage(storage),
             "tracking": lambda: _tracking(tracking_uri), "plugins": _plugins}
    for section, part in parts.items():
        try:
            found += part()
        except Exception as exc:  # noqa: BLE001 - a check that breaks is itself the finding
            found.append(Finding(section, "check", f"could not be checked: {describe(exc)}", "fail",
                                 "see the error; `orch doctor --json` output belongs in a bug report"))
    return found


def as_dicts(found: list[Finding]) -> list[dict]:
    return [asdict(f) for f in found]

"""The checkpoint store of a study: a folder, the study's MLflow tracking server, or object storage.

``study.checkpoint_dir`` names it:

- a folder (default ``mlruns/checkpoints``): :class:`~orchestrator.training.checkpoints.FolderLine`.
  On several machines a retry resumes only where the folder is on a shared filesystem.
- ``mlflow``: the artifacts of the study's MLflow parent run, under ``orch-checkpoints/trial-N/``
  (:class:`MlflowLine`). With a tracking server that serves artifacts (``mlflow server``, the
  default), every worker that reaches the server reaches the checkpoints: a retry on another
  machine, with no shared filesystem, resumes at the next window.
- an fsspec URL (``s3://bucket/prefix`` and the others of
  :data:`orchestrator.object_store.PROTOCOLS`): ``URL/STUDY/trial-N/`` (:class:`FsspecLine`), for a
  study whose machines all reach an object store.

An uploaded line (MLflow, URL) writes each checkpoint to a private temporary folder (the write is
all training waits for) and uploads it from a thread of its own: first the checkpoint, under a name
of its own (``last-EPOCH-WINDOW-RANDOM.ckpt``), then ``last.json``, which names it, then the
previous checkpoint is deleted. A reader reads ``last.json`` first, so it never sees half a
checkpoint; a checkpoint made while the one before is still uploading replaces the one waiting.
The trial waits for the uploads at the end of its fit (a stop signal's checkpoint included).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

from orchestrator import object_store, outages, schema
from orchestrator.errors import ResourceFault
from orchestrator.tracking.client import delete_artifacts
from orchestrator.training.checkpoints import INDEX, FolderLine, folder, index_point

MLFLOW = schema.MLFLOW_CHECKPOINTS
PREFIX = schema.CHECKPOINT_ARTIFACTS
_FILE = re.compile(r"last-[0-9]{1,9}-[0-9]{1,12}-[0-9a-f]{8,32}\.ckpt")  # a name read back from the store


def line_for(checkpoint_dir: str, study: str, lineage: int, mlf=None, run_id: str | None = None,
             tracking_uri: str | None = None, may_write=lambda: True):
    """The store's line of trials ``lineage`` of ``study`` (``may_write()``: whether the trial is
    still this process's, checked before an upload publishes)."""
    if checkpoint_dir == MLFLOW:
        return MlflowLine(mlf, run_id, int(lineage), tracking_uri, may_write)
    if object_store.is_url(checkpoint_dir):
        return FsspecLine(checkpoint_dir, study, int(lineage), may_write)
    return FolderLine(folder(checkpoint_dir, study, lineage))


class UploadedLine:
    """A line kept in a store reached over the network: checkpoints written here, uploaded from a
    thread. Subclasses move the files (:meth:`_put`, :meth:`_put_index`, :meth:`_get`,
    :meth:`_delete`) and say which errors mean "not there" (:attr:`_missing`)."""

    _missing: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, may_write=lambda: True):
        self.may_write = may_write
        self._running = False  # an upload thread is at work (set and cleared under the lock)
        self._tmp: Path | None = None
        self._waiting: tuple[Path, dict] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._last: str | None = None  # the checkpoint this process published last (deleted when replaced)
        self.uploads: list[float] = []  # seconds each upload took (measured, for the benchmark)

    def _put(self, local: Path, name: str) -> None:
        """Upload the file ``local`` as ``name`` in the line."""
        raise NotImplementedError

    def _put_index(self, data: bytes, up: Path) -> None:
        """Make ``data`` the line's ``last.json``, whole or not at all (``up``: a private folder)."""
        raise NotImplementedError

    def _get(self, name: str, into: Path) -> Path:
        """Download ``name`` of the line into the folder ``into``."""
        raise NotImplementedError

    def _delete(self, name: str | None) -> None:
        """Delete ``name`` from the line (``None``: the whole line)."""
        raise NotImplementedError

    def tmp_dir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="orch-ckpt-"))  # this process's own
        return self._tmp

    def publish(self, tmp: Path, index: dict) -> None:
        """Upload ``tmp`` and then its index, from the upload thread."""
        with self._lock:
            if self._waiting is not None:  # not started yet: the newer one replaces it
                self._waiting[0].unlink(missing_ok=True)
            self._waiting = (tmp, index)
            if not self._running:
                self._running = True
                self._thread = threading.Thread(target=self._upload_all, name="orch-ckpt-upload", daemon=True)
                self._thread.start()

    def _upload_all(self) -> None:
        while True:
            with self._lock:
                job, self._waiting = self._waiting, None
                if job is None:
                    self._running = False
                    return
            tmp, index = job
            started = time.perf_counter()
            try:
                self._upload(tmp, index)
                self._error = None  # the latest checkpoint is the one a retry needs
            except Exception as exc:  # noqa: BLE001 - reported by wait()
                self._error = exc
            finally:
                tmp.unlink(missing_ok=True)
            self.uploads.append(time.perf_counter() - started)

    def _upload(self, tmp: Path, index: dict) -> None:
        name = f"last-{index['epoch'] + 1}-{index['window'] or 0}-{secrets.token_hex(8)}.ckpt"
        with tempfile.TemporaryDirectory(prefix="orch-up-") as up:
            self._put(tmp, name)
            previous = self._last
            if previous is None:  # the first of this process: the one an earlier attempt published
                with contextlib.suppress(Exception):  # unreadable: a leftover, collected with the line
                    previous = (self._read_index() or {}).get("file")
            if not self.may_write():  # declared lost meanwhile: the line is its retry's now
                with contextlib.suppress(Exception):
                    self._delete(name)
                return
            self._put_index(json.dumps({**index, "file": name}).encode(), Path(up))
            self._last = name
        if previous and previous != name:
            with contextlib.suppress(Exception):  # a leftover is collected with the line
                self._delete(previous)

    def _read_index(self) -> dict | None:
        """The line's index (``None``: none, or not one orch wrote); an error of the store other than
        :attr:`_missing` is raised."""
        with tempfile.TemporaryDirectory(prefix="orch-dl-") as down:
            try:
                index = json.loads(self._get(INDEX, Path(down)).read_text())
            except (*self._missing, ValueError):
                return None
        if not isinstance(index, dict) or not isinstance(index.get("file"), str) or not _FILE.fullmatch(index["file"]):
            return None
        return index

    def fetch(self, key: str) -> tuple[Path, int, int | None] | None:
        """Download the checkpoint to resume from into this process's folder (``None``: none for ``key``)."""
        for _ in range(2):  # a newer checkpoint may replace the one just read: read the index again
            index = self._read_index()
            point = index_point(index) if index is not None and index.get("key") == key else None
            if point is None:
                return None
            try:
                got = self._get(index["file"], self.tmp_dir())
            except self._missing:
                continue
            return got, *point
        return None

    def wait(self) -> Exception | None:
        """Wait for the uploads; what made the latest one fail, if it failed."""
        thread = self._thread
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        return error

    def release(self) -> None:
        """Remove this process's private folder (a checkpoint downloaded to resume from)."""
        if self._tmp is not None and not self._running:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def discard_own(self) -> None:
        with self._lock:
            self._waiting = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def remove(self) -> None:
        """Delete the line's checkpoints from the store (after the uploads under way: none comes back)."""
        with self._lock:
            self._waiting = None
        if self._thread is not None:
            self._thread.join()
        self.discard_own()
        with contextlib.suppress(Exception):  # nothing there
            self._delete(None)


class MlflowLine(UploadedLine):
    """A line's checkpoints in the artifacts of the study's MLflow run ``run_id``."""

    def __init__(self, mlf, run_id: str, lineage: int, tracking_uri: str | None = None, may_write=lambda: True):
        from mlflow.exceptions import MlflowException

        super().__init__(may_write)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in a worker's log
        self.mlf, self.run_id, self.tracking_uri = mlf, run_id, tracking_uri
        self.path = f"{PREFIX}/trial-{int(lineage)}"
        self._missing = (MlflowException, OSError)

    def _put(self, local: Path, name: str) -> None:
        with tempfile.TemporaryDirectory(prefix="orch-up-") as up:
            try:
                os.link(local, Path(up) / name)  # the same bytes under the name it has in the store
            except OSError:  # another filesystem
                shutil.copyfile(local, Path(up) / name)
            self.mlf.log_artifact(self.run_id, str(Path(up) / name), self.path)

    def _put_index(self, data: bytes, up: Path) -> None:
        (up / INDEX).write_bytes(data)
        self.mlf.log_artifact(self.run_id, str(up / INDEX), self.path)

    def _get(self, name: str, into: Path) -> Path:
        return Path(self.mlf.download_artifacts(self.run_id, f"{self.path}/{name}", str(into)))

    def _delete(self, name: str | None) -> None:
        delete_artifacts(self.mlf, self.run_id, self.path if name is None else f"{self.path}/{name}",
                         self.tracking_uri)


class FsspecLine(UploadedLine):
    """A line's checkpoints under ``URL/STUDY/trial-N/`` of object storage: each file is one object,
    written whole (the index too). Reading the line, "not found" is the only error that means no
    checkpoint: the store not answering interrupts the trial (retried, the line kept), and any other
    error (no right to read) stops the study, instead of a retry starting over."""

    _missing = (FileNotFoundError,)

    def __init__(self, url: str, study: str, lineage: int, may_write=lambda: True):
        super().__init__(may_write)
        self.url = url
        self.fs, root = object_store.open_root(url)
        self.path = object_store.line_path(root, study, lineage)

    def _put(self, local: Path, name: str) -> None:
        self.fs.put_file(str(local), f"{self.path}/{name}")

    def _put_index(self, data: bytes, up: Path) -> None:
        self.fs.pipe_file(f"{self.path}/{INDEX}", data)  # one object, replaced whole

    def _get(self, name: str, into: Path) -> Path:
        target = Path(into) / name
        try:
            self.fs.get_file(f"{self.path}/{name}", str(target))
        except FileNotFoundError:
            raise
        except Exception as exc:
            what = f"the checkpoint store {self.url}"
            if outages.connection_problem(exc):
                raise outages.Unavailable(what, outages.connection_problem(exc)) from exc
            raise ResourceFault(f"{what} cannot be read ({object_store.describe(exc)}): a retry would start "
                                "over; give this machine the right to read it, then run the study again") from exc
        return target

    def _delete(self, name: str | None) -> None:
        if name is None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path, recursive=True)
            self.fs.invalidate_cache(self.path)
        else:
            self.fs.rm_file(f"{self.path}/{name}")

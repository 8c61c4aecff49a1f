"""The checkpoint store of a study: a folder, or the study's MLflow tracking server.

``study.checkpoint_dir`` names it:

- a folder (default ``mlruns/checkpoints``): :class:`~orchestrator.training.checkpoints.FolderLine`.
  On several machines a retry resumes only where the folder is on a shared filesystem.
- ``mlflow``: the artifacts of the study's MLflow parent run, under ``orch-checkpoints/trial-N/``
  (:class:`MlflowLine`). With a tracking server that serves artifacts (``mlflow server``, the
  default), every worker that reaches the server reaches the checkpoints: a retry on another
  machine, with no shared filesystem, resumes at the next window.

An MLflow line writes each checkpoint to a private temporary folder (the write is all training
waits for) and uploads it from a thread of its own: first the checkpoint, under a name of its own
(``last-EPOCH-WINDOW-RANDOM.ckpt``), then ``last.json``, which names it, then the previous
checkpoint is deleted. A reader reads ``last.json`` first, so it never sees half a checkpoint; a
checkpoint made while the one before is still uploading replaces the one waiting. The trial waits
for the uploads at the end of its fit (a stop signal's checkpoint included).
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

from orchestrator import schema
from orchestrator.tracking.client import delete_artifacts
from orchestrator.training.checkpoints import INDEX, FolderLine, folder, index_point

MLFLOW = schema.MLFLOW_CHECKPOINTS
PREFIX = schema.CHECKPOINT_ARTIFACTS
_FILE = re.compile(r"last-\d{1,9}-\d{1,12}-[0-9a-f]{8,32}\.ckpt")  # a name read back from the store


def line_for(checkpoint_dir: str, study: str, lineage: int, mlf=None, run_id: str | None = None,
             tracking_uri: str | None = None, may_write=lambda: True):
    """The store's line of trials ``lineage`` of ``study`` (``may_write()``: whether the trial is
    still this process's, checked before an upload publishes)."""
    if checkpoint_dir == MLFLOW:
        return MlflowLine(mlf, run_id, int(lineage), tracking_uri, may_write)
    return FolderLine(folder(checkpoint_dir, study, lineage))


class MlflowLine:
    """A line's checkpoints in the artifacts of the study's MLflow run ``run_id``."""

    def __init__(self, mlf, run_id: str, lineage: int, tracking_uri: str | None = None, may_write=lambda: True):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in a worker's log
        self.mlf, self.run_id, self.tracking_uri, self.may_write = mlf, run_id, tracking_uri, may_write
        self._running = False  # an upload thread is at work (set and cleared under the lock)
        self.path = f"{PREFIX}/trial-{int(lineage)}"
        self._tmp: Path | None = None
        self._waiting: tuple[Path, dict] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.uploads: list[float] = []  # seconds each upload took (measured, for the benchmark)

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
            try:
                os.link(tmp, Path(up) / name)  # the same bytes under the name it has in the store
            except OSError:  # another filesystem
                shutil.copyfile(tmp, Path(up) / name)
            self.mlf.log_artifact(self.run_id, str(Path(up) / name), self.path)
            previous = self._read_index()
            if not self.may_write():  # declared lost meanwhile: the line is its retry's now
                with contextlib.suppress(Exception):
                    self._delete(f"{self.path}/{name}")
                return
            (Path(up) / INDEX).write_text(json.dumps({**index, "file": name}))
            self.mlf.log_artifact(self.run_id, str(Path(up) / INDEX), self.path)
        if previous and previous.get("file") != name:
            with contextlib.suppress(Exception):  # a leftover is collected with the line
                self._delete(f"{self.path}/{previous['file']}")

    def _read_index(self) -> dict | None:
        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory(prefix="orch-dl-") as down:
            try:
                got = self.mlf.download_artifacts(self.run_id, f"{self.path}/{INDEX}", down)
                index = json.loads(Path(got).read_text())
            except (MlflowException, OSError, ValueError):
                return None
        if not isinstance(index, dict) or not isinstance(index.get("file"), str) or not _FILE.fullmatch(index["file"]):
            return None
        return index

    def fetch(self, key: str) -> tuple[Path, int, int | None] | None:
        """Download the checkpoint to resume from into this process's folder (``None``: none for ``key``)."""
        from mlflow.exceptions import MlflowException

        for _ in range(2):  # a newer checkpoint may replace the one just read: read the index again
            index = self._read_index()
            point = index_point(index) if index is not None and index.get("key") == key else None
            if point is None:
                return None
            try:
                got = self.mlf.download_artifacts(self.run_id, f"{self.path}/{index['file']}", str(self.tmp_dir()))
            except (MlflowException, OSError):
                continue
            return Path(got), *point
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
        """Delete the line's checkpoints from the store."""
        self.discard_own()
        with contextlib.suppress(Exception):  # nothing there
            self._delete(self.path)

    def _delete(self, path: str) -> None:
        delete_artifacts(self.mlf, self.run_id, path, self.tracking_uri)

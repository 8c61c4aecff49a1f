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
from orchestrator.training.checkpoints import INDEX, FolderLine, folder

MLFLOW = schema.MLFLOW_CHECKPOINTS
PREFIX = schema.CHECKPOINT_ARTIFACTS
_FILE = re.compile(r"last-\d{1,9}-\d{1,12}-[0-9a-f]{8,32}\.ckpt")  # a name read back from the store


def line_for(checkpoint_dir: str, study: str, lineage: int, mlf=None, run_id: str | None = None,
             tracking_uri: str | None = None):
    """The store's line of trials ``lineage`` of ``study``."""
    if checkpoint_dir == MLFLOW:
        return MlflowLine(mlf, run_id, int(lineage), tracking_uri)
    return FolderLine(folder(checkpoint_dir, study, lineage))


class MlflowLine:
    """A line's checkpoints in the artifacts of the study's MLflow run ``run_id``."""

    def __init__(self, mlf, run_id: str, lineage: int, tracking_uri: str | None = None):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in a worker's log
        self.mlf, self.run_id, self.tracking_uri = mlf, run_id, tracking_uri
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
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._upload_all, name="orch-ckpt-upload", daemon=True)
                self._thread.start()

    def _upload_all(self) -> None:
        while True:
            with self._lock:
                job, self._waiting = self._waiting, None
                if job is None:
                    return
            tmp, index = job
            started = time.perf_counter()
            try:
                self._upload(tmp, index)
            except BaseException as exc:  # noqa: BLE001 - kept for wait(), which raises it in the trial
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
            (Path(up) / INDEX).write_text(json.dumps({**index, "file": name}))
            self.mlf.log_artifact(self.run_id, str(Path(up) / INDEX), self.path)
        if previous and previous.get("file") != name:
            with contextlib.suppress(Exception):  # a leftover is collected with the line
                self._repo().delete_artifacts(f"{self.path}/{previous['file']}")

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
            if index is None or index.get("key") != key:
                return None
            try:
                got = self.mlf.download_artifacts(self.run_id, f"{self.path}/{index['file']}", str(self.tmp_dir()))
            except (MlflowException, OSError):
                continue
            window = index.get("window")
            return Path(got), int(index["epoch"]) + 1, (int(window) if window is not None else None)
        return None

    def wait(self) -> None:
        """Wait for the uploads; raise what one of them raised."""
        thread = self._thread
        if thread is not None:
            thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

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
            self._repo().delete_artifacts(self.path)

    def _repo(self):
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(self.mlf.get_run(self.run_id).info.artifact_uri, self.tracking_uri)

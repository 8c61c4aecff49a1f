"""What a study's checkpoint store holds: one line of trials per folder (``trial-N``), its size, and
collecting the lines that ended.

A line is *live* while one of its trials runs or waits (a retry queued), or failed in a way that is
retried (interrupted, or lost fewer than ``MAX_LOSSES`` times) and is not retried yet; any other
line ended (complete, pruned, failed, lost for the last time) and nothing will resume from it.
``study run`` and ``study worker`` remove the ended lines when they finish; ``orch study clean``
does it at any time (``--all``: every line, live ones too), and ``orch study show`` reports the
store's size. The store is read through :mod:`orchestrator.training.stores`' layout (a folder per
line under ``ROOT/STUDY/`` of a folder or of a URL's store, or ``orch-checkpoints/trial-N/`` in the
study's MLflow run) without importing torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from orchestrator import names, object_store, safe_files, schema
from orchestrator.errors import StoreError
from orchestrator.execution.outcomes import retryable
from orchestrator.secrets import MASK
from orchestrator.tracking.client import client, delete_artifacts

_LINE = re.compile(r"trial-([0-9]{1,9})")  # a folder name read back from a store: nothing else is touched


class Store:
    """A study's checkpoint store: ``checkpoint_dir`` (a folder, an fsspec URL, or ``mlflow``: the
    study's MLflow run ``run_id`` through the client ``mlf``)."""

    def __init__(self, checkpoint_dir: str | None, study: str, mlf=None, run_id: str | None = None,
                 tracking_uri: str | None = None):
        self.dir = checkpoint_dir or str(Path("mlruns") / "checkpoints")
        self.study, self.mlf, self.run_id, self.tracking_uri = names.check(study), mlf, run_id, tracking_uri

    @property
    def in_mlflow(self) -> bool:
        return self.dir == schema.MLFLOW_CHECKPOINTS

    @property
    def in_url(self) -> bool:
        return object_store.is_url(self.dir)

    def where(self) -> str:
        if self.in_mlflow:
            return f"the study's MLflow run ({schema.CHECKPOINT_ARTIFACTS}/)"
        if self.in_url:
            return f"{self.dir.rstrip('/')}/{self.study}"
        return str(Path(self.dir) / self.study)

    def lines(self) -> dict[int, int]:
        """Every line in the store and its size in bytes."""
        if self.in_url:
            return self._url_lines()
        return self._mlflow_lines() if self.in_mlflow else self._folder_lines()

    def _base(self) -> Path:
        root = Path(self.dir).resolve()
        base = names.under(root, self.study)
        if base != root / self.study:  # a link at the study's folder: never followed to another study's lines
            raise StoreError(f"{root / self.study} is a symbolic link: a study's checkpoint folder must be a real "
                             "folder of the store; remove the link")
        return base

    def _folder_lines(self) -> dict[int, int]:
        base, found = self._base(), {}
        try:
            entries = list(os.scandir(base)) if not base.is_symlink() else []
        except OSError:  # no folder yet
            return {}
        for entry in entries:
            match = _LINE.fullmatch(entry.name)
            if match and entry.is_dir(follow_symlinks=False):
                with os.scandir(entry.path) as files:
                    found[int(match[1])] = sum(f.stat(follow_symlinks=False).st_size for f in files
                                               if f.is_file(follow_symlinks=False))
        return found

    def _mlflow_lines(self) -> dict[int, int]:
        if self.mlf is None or not self.run_id:
            return {}
        found = {}
        for entry in self.mlf.list_artifacts(self.run_id, schema.CHECKPOINT_ARTIFACTS):
            match = _LINE.fullmatch(entry.path.rsplit("/", 1)[-1])
            if match and entry.is_dir:
                found[int(match[1])] = sum(f.file_size or 0 for f in self.mlf.list_artifacts(self.run_id, entry.path)
                                           if not f.is_dir)
        return found

    def _url_lines(self) -> dict[int, int]:
        fs, root = object_store.open_root(self.dir)
        found = {}
        try:
            entries = fs.ls(object_store.study_path(root, self.study), detail=True, refresh=True)
        except FileNotFoundError:  # nothing written yet
            return {}
        for entry in entries:
            match = _LINE.fullmatch(entry["name"].rstrip("/").rsplit("/", 1)[-1])
            if match and entry.get("type") == "directory":
                found[int(match[1])] = sum(int(f.get("size") or 0) for f in fs.ls(entry["name"], detail=True,
                                                                                 refresh=True)
                                           if f.get("type") == "file")
        return found

    def remove(self, lineages) -> None:
        """Remove the lines ``lineages`` (a link planted at a line's name is removed, never followed)."""
        fs_root = object_store.open_root(self.dir) if self.in_url and lineages else None
        for lineage in sorted(lineages):
            if fs_root is not None:
                fs, root = fs_root
                try:
                    fs.rm(object_store.line_path(root, self.study, lineage), recursive=True)
                except FileNotFoundError:  # removed meanwhile
                    pass
            elif self.in_mlflow:
                delete_artifacts(self.mlf, self.run_id, f"{schema.CHECKPOINT_ARTIFACTS}/trial-{int(lineage)}",
                                 self.tracking_uri)
            else:
                safe_files.remove(self._base() / f"trial-{int(lineage)}")

    def collect(self, get_trials) -> dict[int, int]:
        """Remove the lines that ended; returns them with the bytes they held. ``get_trials()``: the
        study's trials, read after the store is listed (a line made meanwhile is not taken for ended)."""
        lines = self.lines()
        trials = get_trials()
        ended = {k: v for k, v in lines.items() if k not in live_lineages(trials)}
        self.remove(ended)
        return ended


def of_study(ostudy, stored, tracking_uri: str | None = None) -> Store:
    """The checkpoint store of the Optuna study ``ostudy`` (``stored``: its study file, as stored
    with it; ``tracking_uri``: the MLflow store, else the one the study recorded)."""
    checkpoint_dir = stored.section.checkpoint_dir if stored is not None else None
    mlf, uri = None, tracking_uri or ostudy.user_attrs.get(schema.TRACKING_URI)
    if checkpoint_dir == schema.MLFLOW_CHECKPOINTS and uri and MASK not in uri:
        mlf = client(uri)
    return Store(checkpoint_dir, ostudy.study_name, mlf, ostudy.user_attrs.get(schema.PARENT_RUN), uri)


def live_lineages(trials) -> set[int]:
    """The lines that a trial may still resume from."""
    retried = {t.user_attrs.get(schema.RETRY_OF) for t in trials}
    live = set()
    for t in trials:
        waiting = t.state.name in ("RUNNING", "WAITING")
        if waiting or (retryable(t) and t.number not in retried):
            live.add(int(t.user_attrs.get(schema.LINEAGE, t.number)))
    return live


def size_text(n: int) -> str:
    """``60.9 KB``: bytes in decimal units."""
    if n < 1000:
        return f"{n} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"

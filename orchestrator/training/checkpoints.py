"""The study's checkpoint store: what lets a retried trial continue instead of starting over.

Each trial of a study writes ``last.ckpt`` (weights, optimiser and scheduler, the loops' progress,
the callbacks' state, the random number generators' states, the training loader's position and
shuffle state: :mod:`orchestrator.training.resumable`) into a folder of its *lineage*: the trial it
retries, or itself. It is written at the end of every epoch but the last, and between two training
windows every ``study.checkpoint_every`` (seconds and/or windows) and when a stop is requested (a
preemption's SIGTERM), with the module's carried TBPTT state and running sums
(:meth:`~orchestrator.contracts.module.SequenceModule.window_state`). The file becomes the one to
resume from (``last.json`` names its epoch, its window and the trial's fingerprint) only once
every finished epoch's metrics are in MLflow, so a retry never skips an epoch that was not logged,
and never resumes another trial's checkpoint. The trial's best checkpoint
(``best.ckpt``, logged to MLflow at the end) lives beside it. A trial that is interrupted
(Ctrl-C, SIGTERM, preemption) or lost (its worker died) leaves the folder behind; its retry
resumes from ``last.ckpt`` at the next window, and its MLflow run receives the earlier epochs'
metrics from the interrupted run (:func:`orchestrator.tracking.runs.copy_history`), so that every
epoch is logged once. A trial that ends
(complete, pruned, failed) removes its folder.

Files are written to a fresh temporary name of the writing process, created exclusively, and renamed
(:mod:`orchestrator.safe_files`), so a kill mid-write leaves the previous epoch's checkpoint whole and
a link planted in the store is never written through; they are loaded with ``weights_only=True``. A
line's folder is a real folder of the user who runs the trial, which no one else may write into:
a link planted at its name is removed, never followed, and another user's folder is refused. The store is
``study.checkpoint_dir`` (default ``mlruns/checkpoints``): on several machines, a shared
filesystem lets a retry on another machine resume too, and so does ``mlflow``, the study's MLflow
run on its tracking server (:mod:`orchestrator.training.stores`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import stat
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from orchestrator import names, safe_files
from orchestrator.errors import StoreError
from orchestrator.execution import stopping
from orchestrator.training.resumable import ResumableLoader

LAST = "last.ckpt"
INDEX = "last.json"
WINDOW = "orch_window"  # the module's window_state in a checkpoint taken between two windows


def folder(root: str | Path, study: str, lineage: int) -> Path:
    """The folder of a line of trials in the store at ``root``: ``ROOT/STUDY/trial-LINEAGE``.

    Refused (:class:`~orchestrator.errors.UsageError`, :class:`~orchestrator.errors.StoreError`)
    where the study's folder would lie outside ``root`` or is a link; the line's own folder is not
    resolved (a link planted there is removed by :func:`remove` and :class:`LastCheckpoint`).
    """
    base = Path(root).resolve()
    study_dir = names.under(base, study)
    if study_dir != base / study:  # a link at the study's folder, even to another folder of the store
        raise StoreError(f"{base / study} is a symbolic link: a study's checkpoint folder must be a real folder "
                         "of the store; remove the link, or set study.checkpoint_dir to a folder of your own")
    return study_dir / f"trial-{int(lineage)}"  # an integer, whatever a shared storage says


def fingerprint(study_id: int, lineage: int, params: dict) -> str:
    """What ties a checkpoint to one line of trials of one study (and its parameters)."""
    text = json.dumps([study_id, lineage, sorted(params.items())], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resume_point(directory: Path, key: str) -> tuple[int, int | None] | None:
    """Where a retry resumes from ``directory``: the epoch, and the window of that epoch after which
    its checkpoint was taken (``None``: the epoch's start); ``None``: nothing to resume for ``key``."""
    directory = Path(directory)
    try:
        if not stat.S_ISDIR(os.lstat(directory).st_mode):  # a link planted at the folder's name
            return None
        index = json.loads(safe_files.read_regular(directory / INDEX))
        if not stat.S_ISREG(os.lstat(directory / LAST).st_mode):
            return None
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("key") != key:
        return None
    return index_point(index)


def index_point(index: dict) -> tuple[int, int | None] | None:
    """(epoch, window) to resume at from a ``last.json`` read back from a store (``None``: not valid)."""
    epoch, window = index.get("epoch"), index.get("window")
    if type(epoch) is not int or not -1 <= epoch < 10**9 or \
            (window is not None and (type(window) is not int or not 0 < window < 10**12)):
        return None
    return epoch + 1, window


def _rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class LastCheckpoint(pl.Callback):
    """Keeps ``last.ckpt`` in ``directory``: written at the end of every training epoch but the
    last (after its validation), and between two training windows every ``every_windows`` windows
    or ``every_seconds`` seconds (whichever comes first) and as soon as a stop is requested
    (:mod:`orchestrator.execution.stopping`: a preemption's SIGTERM); published once the loggers
    have written every finished epoch's metrics (at once for a window's checkpoint, when the next
    epoch starts for an epoch's). Carries the RNG states in its own state, and the module's
    :meth:`~orchestrator.contracts.module.SequenceModule.window_state` in a window's checkpoint."""

    def __init__(self, line, key: str, every_windows: int | None = None, every_seconds: float | None = None,
                 may_write=lambda: True):
        self.line = line if hasattr(line, "publish") else FolderLine(Path(line))  # a store's line, or a folder
        self.may_write = may_write  # whether the trial is still this process's (else nothing is published)
        self.directory = self.line.tmp_dir()
        self.key = key
        self.every_windows = every_windows
        self.every_seconds = every_seconds
        self._pending: tuple[Path, dict] | None = None
        self._since = 0  # windows trained since the last checkpoint
        self._last = time.monotonic()
        self._window: int | None = None  # the window a checkpoint being saved was taken after
        self._saved_at: tuple[int, int] | None = None  # (epoch, window index) of the last window checkpoint

    def _new(self, name: str, data: bytes = b"") -> Path:
        """A new file of this process beside ``name``, created exclusively (``NAME.<random>.<pid>.tmp``)."""
        return safe_files.write_new(self.directory, f"{name}.", data, suffix=f".{os.getpid()}.tmp")

    def _save(self, trainer, finished: int, window: int | None) -> None:
        if self._pending is not None:  # never published (the tracking store was away): this one replaces it
            self._pending[0].unlink(missing_ok=True)
            self._pending = None
        loader = _resumable(trainer)
        if loader is not None:
            loader.position = window
        self._window = window
        tmp = self._new(LAST)
        try:
            trainer.save_checkpoint(tmp)  # into the file just created, in a folder no one else writes to
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            self._window = None
            if loader is not None:
                loader.position = None
        self._pending = (tmp, {"epoch": finished - 1, "window": window, "key": self.key})
        self._since, self._last = 0, time.monotonic()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._since += 1  # the epoch's last window: the epoch's end has its own checkpoint, after its validation
        due = stopping.requested() is not None or (self.every_windows and self._since >= self.every_windows) \
            or (self.every_seconds and time.monotonic() - self._last >= self.every_seconds)
        if due:
            self.save_window(trainer, batch_idx)

    def save_window(self, trainer, batch_idx: int) -> None:
        """Checkpoint the fit after window ``batch_idx`` of the current epoch and publish it (once per
        window: the interruption callback calls it too, for a stop that came after this callback ran)."""
        if self._saved_at == (trainer.current_epoch, batch_idx) or batch_idx + 1 >= trainer.num_training_batches \
                or not hasattr(trainer.lightning_module, "window_state") or _resumable(trainer) is None:
            return
        if (batch_idx + 1) % max(int(trainer.accumulate_grad_batches), 1):
            return  # gradients accumulated but not applied: a checkpoint does not hold them
        every = trainer.val_check_batch
        if isinstance(every, int) and every and (batch_idx + 1) % every == 0:
            return  # a validation is due after this window: a resume would skip it
        self._saved_at = (trainer.current_epoch, batch_idx)
        self._save(trainer, trainer.current_epoch, batch_idx + 1)
        self._publish(trainer)

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs:
            return  # the last epoch: a retry would have nothing left to train
        self._save(trainer, trainer.current_epoch + 1, None)

    def on_train_epoch_start(self, trainer, module) -> None:
        self._publish(trainer)

    def on_train_start(self, trainer, module) -> None:
        # Lightning loads a training loader's state only when it resumes inside an epoch: at an
        # epoch's end its shuffle state (sum_game's generator) is the loader's to load here, before
        # the loader draws its first window
        states, loader = trainer.fit_loop._combined_loader_states_to_load, _resumable(trainer)
        if states and loader is not None:
            loader.load_state_dict(states[0])
            trainer.fit_loop._combined_loader_states_to_load = []

    def _publish(self, trainer) -> None:
        if self._pending is None:
            return
        if not self.may_write():  # declared lost: its retry writes this line now
            self._pending[0].unlink(missing_ok=True)
            self._pending = None
            return
        written = True
        for logger in trainer.loggers:  # the finished epochs' metrics first, then the checkpoint
            written = (getattr(logger, "flush", logger.save)() is not False) and written
        if not written:  # the tracking store is away: published once its metrics are written
            return
        tmp, index = self._pending
        self._pending = None
        self.line.publish(tmp, index)

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        if self._window is not None:
            checkpoint[WINDOW] = module.window_state()

    def on_load_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        if checkpoint.get(WINDOW) is not None:
            module.restore_window(checkpoint[WINDOW])

    def state_dict(self) -> dict:
        return {"rng": _rng_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        _set_rng_state(state_dict["rng"])


def _resumable(trainer) -> ResumableLoader | None:
    """The fit's training loader, where it can be resumed between two windows."""
    loader = trainer.fit_loop._combined_loader
    flat = loader.flattened if loader is not None else []
    return flat[0] if len(flat) == 1 and isinstance(flat[0], ResumableLoader) else None


class FolderLine:
    """A line's checkpoints in a folder of the store (local, or a shared filesystem): written in
    place under temporary names and published by renaming."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def tmp_dir(self) -> Path:
        """Where the checkpoint callback writes its temporary files (the line's own folder)."""
        return own_folder(self.folder)

    def publish(self, tmp: Path, index: dict) -> None:
        os.replace(tmp, self.folder / LAST)
        fresh = safe_files.write_new(self.folder, f"{INDEX}.", json.dumps(index).encode(),
                                     suffix=f".{os.getpid()}.tmp")
        os.replace(fresh, self.folder / INDEX)

    def fetch(self, key: str) -> tuple[Path, int, int | None] | None:
        """The checkpoint to resume from, its epoch and window (``None``: nothing for ``key``)."""
        point = resume_point(self.folder, key)
        return None if point is None else (self.folder / LAST, *point)

    def wait(self) -> None:
        """Nothing is uploaded: nothing to wait for, no failure to report."""

    def release(self) -> None:
        """Nothing of this process's to clean up: the folder is the line's."""

    def discard_own(self) -> None:
        """Remove this process's temporary files (its trial was taken over)."""
        for tmp in self.folder.glob(f"*.{os.getpid()}.tmp"):
            tmp.unlink(missing_ok=True)

    def remove(self) -> None:
        remove(self.folder)


def own_folder(directory: Path) -> Path:
    """``directory``, made sure to be a real folder of this user that no one else may write into: a
    link or file planted at its name is removed first (never followed), write permission for others
    taken away, and anything in it but regular files (a link planted while others could write
    there) removed; another user's folder is refused
    (:class:`~orchestrator.errors.StoreError`)."""
    directory = Path(directory)
    for _ in range(3):
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):  # made meanwhile: checked on the next round
                directory.mkdir(parents=True, mode=0o755)
            continue
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):  # a link, a file
                raise
            safe_files.remove(directory)
            continue
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                raise StoreError(f"{directory} belongs to another user (uid {st.st_uid}): a trial's checkpoints are "
                                 "written only to a folder of the user who runs it; remove it, or set "
                                 "study.checkpoint_dir to a folder of your own")
            if st.st_mode & 0o022:
                os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o022)
            with os.scandir(fd) as entries:  # planted while others could write here: never written through
                for entry in entries:
                    if not entry.is_file(follow_symlinks=False):
                        safe_files.remove(directory / entry.name)
        finally:
            os.close(fd)
        return directory
    raise StoreError(f"{directory} keeps being replaced while orch makes it a folder: someone else writes to "
                     "the checkpoint store; set study.checkpoint_dir to a folder of your own")


def remove(directory: Path) -> None:
    """Remove a line's folder (nothing is left to resume); a link planted at its name is removed,
    never followed."""
    safe_files.remove(directory)

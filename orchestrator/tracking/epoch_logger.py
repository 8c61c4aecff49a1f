"""The Lightning logger that writes a trial's per-epoch metrics to its MLflow run, in batches.

Kept apart from :mod:`orchestrator.tracking.client` so that commands which only read studies and runs
(``study show``, ``study best``, ``orch ui``) never import Lightning.
"""

from __future__ import annotations

import time

from pytorch_lightning.loggers.logger import Logger

from orchestrator.errors import ResourceFault
from orchestrator.outages import Unavailable


class EpochLogger(Logger):
    """Lightning logger writing to an existing MLflow run, buffered and flushed per epoch.

    Metrics are stored with ``step`` = epoch, so the MLflow UI plots them per epoch. Lightning
    calls :meth:`save` after every ``log_metrics``; writes happen at most every ``flush_seconds``
    (and at each new epoch and at the end), so a module that logs every step costs a database
    write every few seconds, not one per step.

    While the tracking store is away (:mod:`orchestrator.outages`: a call made during the fit
    raises :class:`~orchestrator.outages.Unavailable`), the metrics stay in the buffer, in order,
    and training goes on; they are written when it answers, at the latest by the final flush.
    ``may_write()``: whether the run is still this worker's to write (a trial declared lost
    meanwhile writes nothing more: its buffer is dropped).
    """

    def __init__(self, mlf, run_id: str, flush_seconds: float = 2.0, may_write=lambda: True):
        super().__init__()
        self._mlf = mlf
        self._run_id = run_id
        self._may_write = may_write
        self._buffer: list = []
        self._epoch: int | None = None
        self._flush_seconds = flush_seconds
        self._last_flush = time.monotonic()

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self._run_id

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # orch logs the resolved settings itself, once, with dotted names

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        epoch = int(metrics.get("epoch", step or 0))
        if self._epoch is not None and epoch != self._epoch:
            self.flush()
        self._epoch = epoch
        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch")

    def save(self) -> None:
        if time.monotonic() - self._last_flush >= self._flush_seconds:
            self.flush()

    def flush(self) -> bool:
        """Write the buffer, oldest first; whether all of it is written."""
        self._last_flush = time.monotonic()
        if self._buffer and not self._may_write():
            self._buffer.clear()
            return False
        while self._buffer:
            try:
                self._mlf.log_batch(self._run_id, metrics=self._buffer[:1000])
            except Unavailable:
                return False  # kept for the next flush
            del self._buffer[:1000]
        return True

    def finalize(self, status: str) -> None:
        try:
            self.flush()
        except (Unavailable, ResourceFault):
            pass  # a fit that ends on an outage: the caller's final flush, or the next run, has the rest

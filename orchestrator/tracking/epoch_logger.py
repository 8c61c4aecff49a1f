"""The Lightning logger that writes a trial's per-epoch metrics to its MLflow run, in batches.

Kept apart from :mod:`orchestrator.tracking.client` so that commands which only read studies and runs
(``study show``, ``study best``, ``orch ui``) never import Lightning.
"""

from __future__ import annotations

import time

from pytorch_lightning.loggers.logger import Logger


class EpochLogger(Logger):
    """Lightning logger writing to an existing MLflow run, buffered and flushed per epoch.

    Metrics are stored with ``step`` = epoch, so the MLflow UI plots them per epoch. Lightning
    calls :meth:`save` after every ``log_metrics``; writes happen at most every ``flush_seconds``
    (and at each new epoch and at the end), so a module that logs every step costs a database
    write every few seconds, not one per step.
    """

    def __init__(self, mlf, run_id: str, flush_seconds: float = 2.0):
        super().__init__()
        self._mlf = mlf
        self._run_id = run_id
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

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        while self._buffer:
            batch, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self._mlf.log_batch(self._run_id, metrics=batch)

    def finalize(self, status: str) -> None:
        self.flush()

"""Lightning's output as orch wants it (without importing Lightning: the settings take effect when it is)."""

from __future__ import annotations

import logging
import warnings


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning(level: int | None = None) -> None:
    """Lightning as orch's output wants it: without its product tip and a deprecation warning raised
    inside Lightning itself; with ``level``, its log at that level and none of its warnings (worker
    processes, whose output is the study's, and the plugin kit's tiny fits)."""
    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _NoAdverts) for f in log.filters):
        log.addFilter(_NoAdverts())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    if level is not None:
        logging.getLogger("pytorch_lightning").setLevel(level)
        warnings.filterwarnings("ignore", module="pytorch_lightning")

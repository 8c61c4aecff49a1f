"""What ``orch train`` shows while it trains: a progress bar with the running loss, the module's
own reading of it (perplexity for a language model), the last validation metrics and the
throughput in tokens (or steps) per second of training time.

The numbers come from :meth:`SequenceModule.progress_metrics`, read only when the bar refreshes
(every ``REFRESH`` steps), so the bar costs one host sync per refresh, not one per step.
"""

from __future__ import annotations

import sys

from pytorch_lightning.callbacks import TQDMProgressBar

#: steps between two refreshes of the bar
REFRESH = 10


def _on_stderr(init):
    """Lightning draws its bars on stdout; orch keeps stdout for results (``orch train > out.json``)."""
    def on_stderr(self):
        out, sys.stdout = sys.stdout, sys.stderr
        try:
            return init(self)
        finally:
            sys.stdout = out
    return on_stderr


class TrainingBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = REFRESH):
        super().__init__(refresh_rate=refresh_rate)

    init_sanity_tqdm = _on_stderr(TQDMProgressBar.init_sanity_tqdm)
    init_train_tqdm = _on_stderr(TQDMProgressBar.init_train_tqdm)
    init_validation_tqdm = _on_stderr(TQDMProgressBar.init_validation_tqdm)
    init_test_tqdm = _on_stderr(TQDMProgressBar.init_test_tqdm)

    def get_metrics(self, trainer, pl_module) -> dict[str, int | str | float | dict[str, float]]:
        items: dict = {}
        reading = getattr(pl_module, "progress_metrics", None)
        if reading is not None:
            items.update(reading())
        for key, value in trainer.callback_metrics.items():  # the last validation's metrics
            if key.startswith("val_"):
                items[key] = f"{float(value):.4g}"
        return items

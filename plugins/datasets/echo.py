"""``echo`` (seeds 000/001): a random binary series and the same series ``echo_step`` steps later.

Target ``y[t] = x[t - echo_step]``, and 0 for ``t < echo_step``. The delay is applied to the
whole series *before* it is cut into ``batch_size`` contiguous rows and ``bptt`` windows, so the
target at the start of a window is an input from the previous window: only a model that carries
its state from one window to the next can be right there.

Each split is its own series, drawn in turn from one generator seeded with ``seed`` (train:
``length`` bits, then validation and test: ``val_length`` bits each), so no two seeds share data.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from orchestrator.contracts.dataset import DatasetInfo, SequenceDataModule, StreamWindows
from orchestrator.contracts.settings import Count, Index, Seed


def echo_series(length: int, echo_step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random bit series ``x`` (long ``[length]``) and its echo ``y`` delayed by ``echo_step``."""
    x = torch.randint(0, 2, (length,), generator=generator)
    y = torch.zeros_like(x)
    y[echo_step:] = x[: length - echo_step]
    return x, y


class Echo(SequenceDataModule):
    """The echo task (task ``step_classification``, layout ``stream``).

    Args:
        length: bits in the training series.
        echo_step: delay of the target, in steps.
        batch_size: contiguous rows the series is cut into (validation and test too).
        bptt: window length (steps per batch).
        val_length: bits in the validation series and in the test series.
        seed: seeds the generator of all three series.
    """

    #: small settings for ``orch plugins check`` (orchestrator.registry.checks)
    quick_check_settings = {"length": 3000, "val_length": 600}

    def __init__(self, length: Count = 50_000, echo_step: Index = 3, batch_size: Count = 5, bptt: Count = 15,
                 val_length: Count = 10_000, seed: Seed = 0):
        super().__init__()
        for name, value, low in (("length", length, 1), ("echo_step", echo_step, 0),
                                 ("batch_size", batch_size, 1), ("bptt", bptt, 1),
                                 ("val_length", val_length, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"echo: {name} must be an integer >= {low}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"echo: seed must be an integer, got {seed!r}")
        for name, value in (("length", length), ("val_length", val_length)):
            if value < batch_size:
                raise ValueError(f"echo: {name} ({value}) must be at least batch_size ({batch_size}) "
                                 f"to fill every row")
            if value <= echo_step:
                raise ValueError(f"echo: {name} ({value}) must be longer than echo_step ({echo_step})")
        self.length = length
        self.echo_step = echo_step
        self.batch_size = batch_size
        self.bptt = bptt
        self.val_length = val_length
        self.seed = seed
        self._series: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._series is None:
            gen = torch.Generator().manual_seed(self.seed)
            self._series = {
                "train": echo_series(self.length, self.echo_step, gen),
                "val": echo_series(self.val_length, self.echo_step, gen),
                "test": echo_series(self.val_length, self.echo_step, gen),
            }
        return self._series

    def series(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole ``(x, y)`` series of ``train``, ``val`` or ``test`` (long ``[N]`` each)."""
        return self._load()[split]

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def describe(self) -> DatasetInfo:
        return DatasetInfo(task="step_classification", layout="stream", input_size=1, num_classes=2,
                           val_sets=("val",), test_sets=("test",))

    def _loader(self, split: str) -> DataLoader:
        x, y = self.series(split)
        windows = StreamWindows(x.float().unsqueeze(-1), y, self.batch_size, self.bptt)
        return DataLoader(windows, batch_size=None, shuffle=False, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

"""``sum_game`` (seed 003): the running sum of a sequence over ``+ - 0 I``.

``+`` adds 1, ``-`` subtracts 1, ``0`` does nothing and ``I`` inverts the meaning of the
characters after it (a second ``I`` inverts back): ``I++000`` = -2, ``-I--`` = 1,
``0++000`` = 2. The target is the running sum at every step, as floats; the inputs are one-hot
vectors over the four symbols (``input_size`` 4, in the order ``+ - 0 I``).

Sets (every batch holds independent sequences of one length):

* ``train``: as in the seed, all ``4**length`` sequences are shuffled with a fixed seed and the
  first ``train_fraction`` of them are trained on (reshuffled each epoch, reproducibly);
* ``val``: the rest, held out;
* ``long``: ``long_count`` random sequences of each length in ``long_lengths``, to show that the
  model generalises to any length; a batch never mixes lengths.

The test dataloaders are named ``test`` (the held-out sequences again: enumerating every
sequence of the training length leaves no third pool) and ``test_long`` (a fresh draw of long
sequences). They have names of their own so that test metrics never overwrite ``val_*`` or
``long_*`` ones.
"""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from orchestrator.contracts.dataset import DatasetInfo, SequenceDataModule
from orchestrator.contracts.settings import Count, Index, Seed

SYMBOLS = "+-0I"
_VALUE = torch.tensor([1, -1, 0, 0])  # what each symbol adds before inversion
_INVERT = SYMBOLS.index("I")
MAX_LENGTH = 10  # 4**10 sequences already take ~170 MB as one-hot floats


def _check_seq(seq: str) -> list[int]:
    bad = sorted(set(seq) - set(SYMBOLS))
    if bad:
        raise ValueError(f"sum_game: {seq!r} has characters outside {SYMBOLS!r}: {bad}")
    return [SYMBOLS.index(c) for c in seq]


def running_sums(ids: torch.Tensor) -> torch.Tensor:
    """Running sums ``[N, T]`` (float) of symbol ids ``[N, T]`` (0..3 for ``+ - 0 I``)."""
    # every I before step t flips the sign of step t; an I itself adds nothing
    flips = torch.cumsum((ids == _INVERT).long(), dim=1)
    sign = 1 - 2 * (flips % 2)
    return torch.cumsum(_VALUE[ids] * sign, dim=1).float()


def running_sum(seq: str) -> list[int]:
    """The running sum after each character of ``seq``: ``running_sum("-I--") == [-1, -1, 0, 1]``."""
    ids = torch.tensor([_check_seq(seq)], dtype=torch.long)
    return [int(v) for v in running_sums(ids)[0]]


def one_hot(ids: torch.Tensor) -> torch.Tensor:
    """One-hot floats ``[..., 4]`` of symbol ids."""
    return torch.nn.functional.one_hot(ids, len(SYMBOLS)).float()


def encode(seq: str) -> torch.Tensor:
    """The one-hot input ``[len(seq), 4]`` of a sequence, as the model sees it."""
    return one_hot(torch.tensor(_check_seq(seq), dtype=torch.long))


def decode(x: torch.Tensor) -> str:
    """The sequence behind a one-hot input ``[T, 4]`` (inverse of :func:`encode`)."""
    return "".join(SYMBOLS[i] for i in x.argmax(dim=-1).tolist())


def all_sequences(length: int) -> torch.Tensor:
    """Symbol ids ``[4**length, length]`` of every sequence, in lexicographic order of ``+ - 0 I``."""
    return torch.tensor(list(itertools.product(range(len(SYMBOLS)), repeat=length)), dtype=torch.long)


class _Batches(Dataset):
    """Ready-made ``(x, y)`` batches, for ``DataLoader(..., batch_size=None)``."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        return self.batches[k]


def _batches(ids: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = one_hot(ids), running_sums(ids)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(ids), batch_size)]


class SumGame(SequenceDataModule):
    """The sum game (task ``step_regression``, layout ``sequences``).

    Args:
        length: length of the enumerated sequences (all ``4**length`` of them; at most 10).
        train_fraction: share of them trained on (the seed: 1/4); the rest is ``val``.
        seed: seeds the split (``seed``), the training shuffle (``seed``), the long validation
            sequences (``seed + 1``) and the long test sequences (``seed + 2``).
        batch_size: sequences per batch, for every set.
        long_lengths: lengths of the ``long`` sequences (empty: no ``long`` set).
        long_count: random sequences per long length.
        bptt: window length for the module (longer sequences are cut into windows with the state
            carried across them); ``None``: whole sequences.
    """

    #: small settings for ``orch plugins check`` (orchestrator.registry.checks)
    quick_check_settings = {"length": 4, "long_lengths": [8], "long_count": 20}

    def __init__(self, length: int = 6, train_fraction: float = 0.25, seed: Seed = 0, batch_size: Count = 32,
                 long_lengths: tuple[int, ...] | list[int] = (50, 100), long_count: Index = 500,
                 bptt: Count | None = None):
        super().__init__()
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_LENGTH:
            raise ValueError(f"sum_game: length must be an integer from 1 to {MAX_LENGTH}, got {length!r}")
        if not isinstance(train_fraction, (int, float)) or not 0 < train_fraction < 1:
            raise ValueError(
                f"sum_game: train_fraction must be between 0 and 1 (exclusive), got {train_fraction!r}")
        total = 4 ** length
        n_train = int(total * train_fraction)
        if not 1 <= n_train < total:
            raise ValueError(f"sum_game: train_fraction {train_fraction} of {total} sequences leaves "
                             f"{n_train} for training and {total - n_train} held out; both must be >= 1")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"sum_game: seed must be an integer, got {seed!r}")
        for name, value in (("batch_size", batch_size), ("long_count", long_count)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sum_game: {name} must be an integer >= 1, got {value!r}")
        if isinstance(long_lengths, (str, bytes)) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in long_lengths):
            raise ValueError(f"sum_game: long_lengths must be a list of integers >= 1, got {long_lengths!r}")
        if bptt is not None and (isinstance(bptt, bool) or not isinstance(bptt, int) or bptt < 1):
            raise ValueError(f"sum_game: bptt must be an integer >= 1 or null, got {bptt!r}")
        self.length = length
        self.train_fraction = train_fraction
        self.n_train = n_train
        self.seed = seed
        self.batch_size = batch_size
        self.long_lengths = tuple(long_lengths)
        self.long_count = long_count
        self.bptt = bptt
        self._data: dict | None = None

    def _long(self, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        batches = []
        for n in self.long_lengths:
            ids = torch.randint(0, len(SYMBOLS), (self.long_count, n), generator=g)
            batches += _batches(ids, self.batch_size)
        return batches

    def _load(self) -> dict:
        if self._data is not None:
            return self._data
        ids = all_sequences(self.length)
        ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(self.seed))]
        train, held_out = ids[: self.n_train], ids[self.n_train:]
        self._data = {
            "train_ids": train,
            "val_ids": held_out,
            "train": TensorDataset(one_hot(train), running_sums(train)),
            "val": _batches(held_out, self.batch_size),
            "long": self._long(self.seed + 1),
            "test_long": self._long(self.seed + 2),
        }
        return self._data

    @property
    def train_ids(self) -> torch.Tensor:
        """Symbol ids ``[n_train, length]`` of the training sequences (split order)."""
        return self._load()["train_ids"]

    @property
    def val_ids(self) -> torch.Tensor:
        """Symbol ids of the held-out sequences."""
        return self._load()["val_ids"]

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def describe(self) -> DatasetInfo:
        long = ("long",) if self.long_lengths else ()
        test_long = ("test_long",) if self.long_lengths else ()
        return DatasetInfo(task="step_regression", layout="sequences", input_size=len(SYMBOLS),
                           val_sets=("val", *long), test_sets=("test", *test_long), bptt=self.bptt)

    @staticmethod
    def _eval_loader(batches) -> DataLoader:
        return DataLoader(_Batches(batches), batch_size=None, shuffle=False, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        # independent sequences: reshuffled each epoch, reproducibly from the seed
        return DataLoader(self._load()["train"], batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed), num_workers=0)

    def val_dataloader(self) -> list[DataLoader]:
        data = self._load()
        return [self._eval_loader(data["val"])] + (
            [self._eval_loader(data["long"])] if self.long_lengths else [])

    def test_dataloader(self) -> list[DataLoader]:
        data = self._load()
        return [self._eval_loader(data["val"])] + (
            [self._eval_loader(data["test_long"])] if self.long_lengths else [])

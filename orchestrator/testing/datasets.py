"""Contract checks for ``orch.datasets`` plugins: ``check_dataset(MyData, **small_settings)``.

Rules (each failure is a :class:`~orchestrator.testing.rules.ContractError` with a fix):

- ``dataset.contract``: a subclass of :class:`~orchestrator.contracts.dataset.SequenceDataModule`
  whose ``describe()`` returns a :class:`~orchestrator.contracts.dataset.DatasetInfo`;
- ``dataset.settings``: its settings pass orch's own validation;
- ``dataset.splits``: a training loader, one validation loader per name in ``val_sets`` and one
  test loader per name in ``test_sets``, none of them empty;
- ``dataset.batches``: ``(x, y)`` batches shaped and typed for the task (token ids below
  ``vocab_size``; ``[B, T, input_size]`` floats; class ids below ``num_classes``);
- ``dataset.windows`` (``stream`` layout): the same ``B`` rows in every batch, in the same order
  on every pass (never shuffled), and for language models each window continuing the last
  (the first input of window k+1 is the last target of window k);
- ``dataset.deterministic``: two instances with the same settings give the same batches.
"""

from __future__ import annotations

import itertools

import torch

from orchestrator.contracts.dataset import DatasetInfo, SequenceDataModule
from orchestrator.testing.rules import ContractError, require, rule
from orchestrator.testing.settings import check_settings

WINDOW_FIX = ("cut the stream into batch_size contiguous rows and serve the windows of columns "
              "[k*bptt, (k+1)*bptt) in order (orchestrator.contracts.dataset.StreamWindows with "
              "DataLoader(batch_size=None, shuffle=False) does this)")


def _loaders(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _batches(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y) for x, y in itertools.islice(iter(loader), n)]


def _check_batch(info: DatasetInfo, x, y, where: str) -> None:
    fix = "see the batch shapes in the orchestrator.contracts.dataset docstring"
    require(isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor), "dataset.batches",
            f"{where}: a batch must be a pair of tensors (x, y), got {type(x).__name__}, {type(y).__name__}", fix)
    if info.task == "language_model":
        require(x.dim() == 2 and x.shape == y.shape, "dataset.batches",
                f"{where}: token ids x {tuple(x.shape)} and y {tuple(y.shape)} must both be [B, T]", fix)
        require(not x.is_floating_point() and not y.is_floating_point(), "dataset.batches",
                f"{where}: token ids must be integers, got {x.dtype}", fix)
        high = int(max(x.max(), y.max())) if x.numel() else 0
        require(info.vocab_size is not None and high < info.vocab_size and int(min(x.min(), y.min())) >= 0,
                "dataset.batches", f"{where}: token id {high} is not below vocab_size={info.vocab_size}",
                "describe() must give the vocabulary's size")
        return
    require(x.dim() == 3 and x.shape[-1] == info.input_size and x.is_floating_point(), "dataset.batches",
            f"{where}: x is {tuple(x.shape)} {x.dtype}, expected [B, T, input_size={info.input_size}] floats", fix)
    require(y.shape == x.shape[:2], "dataset.batches", f"{where}: y is {tuple(y.shape)}, expected [B, T] = "
            f"{tuple(x.shape[:2])}", fix)
    if info.task == "step_classification":
        require(not y.is_floating_point(), "dataset.batches", f"{where}: class ids must be integers, got {y.dtype}",
                fix)
        require(info.num_classes is not None and int(y.max()) < info.num_classes and int(y.min()) >= 0,
                "dataset.batches", f"{where}: class id {int(y.max())} is not below num_classes={info.num_classes}",
                "describe() must give the number of classes")


def check_datamodule(dm: SequenceDataModule, max_batches: int = 3) -> DatasetInfo:
    """Every rule but ``dataset.settings`` and ``dataset.deterministic``, on a built instance (orch
    runs this on the dataset of every run before training). Returns its description."""
    require(isinstance(dm, SequenceDataModule), "dataset.contract",
            f"{type(dm).__name__} is not a SequenceDataModule", "subclass SequenceDataModule")
    with rule("dataset.contract", "describe() must return an orchestrator.contracts.dataset.DatasetInfo"):
        info = dm.describe()
    require(isinstance(info, DatasetInfo), "dataset.contract", f"describe() returned {type(info).__name__}",
            "return a DatasetInfo")
    with rule("dataset.splits", "prepare_data() and setup() must succeed for 'fit' and 'test'"):
        dm.prepare_data()
        dm.setup("fit")
        dm.setup("test")
    loaders = {}
    for split, names in (("train", ("train",)), ("val", info.val_sets), ("test", info.test_sets)):
        with rule("dataset.splits", f"implement {split}_dataloader()"):
            found = _loaders(getattr(dm, f"{split}_dataloader")())
        require(len(found) == len(names), "dataset.splits",
                f"{split}_dataloader() gives {len(found)} loader(s) but describe() names {len(names)}: "
                f"{list(names)}", f"return one {split} loader per name in DatasetInfo."
                                  f"{'val_sets' if split == 'val' else 'test_sets'}, in that order")
        for name, loader in zip(names, found):
            with rule("dataset.batches", "each loader must yield (x, y) pairs"):
                batches = _batches(loader, max_batches)
            require(bool(batches), "dataset.splits", f"the {name} loader is empty", "give every split data")
            for k, (x, y) in enumerate(batches):
                _check_batch(info, x, y, f"{name} batch {k}")
            loaders[name] = (loader, batches)
    if info.layout == "stream":
        for name, (loader, batches) in loaders.items():
            again = _batches(loader, max_batches)
            require(all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again)),
                    "dataset.windows", f"the {name} loader gives other batches on a second pass (shuffled?)",
                    WINDOW_FIX)
            rows = {x.shape[0] for x, _ in batches}
            require(len(rows) == 1, "dataset.windows", f"the {name} batches have {sorted(rows)} rows: a stream "
                    "keeps the same rows from window to window", WINDOW_FIX)
            if info.task == "language_model":
                for k in range(len(batches) - 1):
                    (_, y0), (x1, _) = batches[k], batches[k + 1]
                    require(torch.equal(y0[:, -1], x1[:, 0]), "dataset.windows",
                            f"{name} window {k + 1} does not continue window {k}: row r of a batch must carry "
                            "on where row r of the batch before stopped", WINDOW_FIX)
    return info


def check_dataset(cls: type[SequenceDataModule], **settings) -> None:
    """Run every dataset rule on ``cls`` built with ``settings`` (keep them small: this builds it twice)."""
    require(isinstance(cls, type) and issubclass(cls, SequenceDataModule), "dataset.contract",
            f"{cls!r} is not a subclass of orchestrator.contracts.dataset.SequenceDataModule",
            "subclass SequenceDataModule")
    checked = check_settings(cls, "dataset", settings)
    built = []
    for _ in range(2):
        with rule("dataset.contract", "the class must build from its settings as keyword arguments"):
            torch.manual_seed(0)
            built.append(cls(**checked))
    info = check_datamodule(built[0])
    first = [_batches(loader, 2) for loader in _loaders(built[0].train_dataloader()) +
             _loaders(built[0].val_dataloader())]
    torch.manual_seed(1)  # the data must come from the dataset's seed, not from torch's global state
    built[1].describe()
    built[1].prepare_data()
    built[1].setup("fit")
    second = [_batches(loader, 2) for loader in _loaders(built[1].train_dataloader()) +
              _loaders(built[1].val_dataloader())]
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for batches_a, batches_b in zip(first, second) for a, b in zip(batches_a, batches_b))
    require(same, "dataset.deterministic", "two instances with the same settings give different batches",
            "generate or shuffle data from a generator seeded by a setting (e.g. seed: int = 0)")
    del info


__all__ = ["ContractError", "check_dataset", "check_datamodule"]

"""``orch plugins new``: a plugin package that installs, passes its tests and runs a study on day one.

``new_plugin("cell", "gru", folder)`` writes ``folder/orch-gru/``: ``pyproject.toml`` declaring the
entry point, ``src/orch_gru/__init__.py`` with a small working implementation, ``tests/`` that run
orch's contract kit on it, ``studies/gru.yaml`` (a short study that uses it) and a ``README.md``.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from orchestrator.names import shown

KINDS = ("cell", "dataset", "module")

CELL = '''
"""{title}: a GRU cell for orch (``cell: {{plugin: {name}}}`` in a run or study file)."""

from __future__ import annotations

import torch

from orchestrator.contracts.cell import Cell
from orchestrator.contracts.settings import Count, Probability


class {cls}(Cell):
    """A stack of GRU layers (``torch.nn.GRU``). State: ``h`` of shape ``[num_layers, B, hidden_size]``."""

    def __init__(self, input_size: int, hidden_size: Count, num_layers: Count = 1, dropout: Probability = 0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout)
        # torch applies dropout between layers only: a single layer takes none (and warns if given one)
        self.rnn = torch.nn.GRU(input_size, hidden_size, num_layers, dropout=dropout if num_layers > 1 else 0.0,
                                batch_first=True)

    def init_state(self, batch_size: int, device=None) -> torch.Tensor:
        return torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device)

    def forward(self, x: torch.Tensor, state: torch.Tensor):
        return self.rnn(x, state)
'''

CELL_TEST = '''
from orchestrator.testing import check_cell

from {package} import {cls}


def test_{name}_keeps_the_cell_contract():
    check_cell({cls})  # shapes, state, gradients through the state, chunks = one pass, seed


def test_{name}_with_two_layers_and_dropout():
    check_cell({cls}, hidden_size=6, dropout=0.2)
'''

CELL_STUDY = '''
# A short study of the {name} cell on the echo task: `orch study run studies/{name}.yaml`
name: {name}_echo
seed: 0
dataset: {{plugin: echo, length: 3000, val_length: 600}}
cell: {{plugin: {name}, hidden_size: 8}}
module: {{plugin: step_classification, lr: 0.02}}
trainer: {{max_epochs: 2, accelerator: cpu}}
study:
  metric: val_acc
  direction: maximize
  trials: 2
  sampler: {{type: random, seed: 0}}
  space:
    cell.hidden_size: {{type: int, low: 4, high: 16, step: 4}}
'''

DATASET = '''
"""{title}: a character-level text dataset for orch (``dataset: {{plugin: {name}}}``)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from orchestrator.contracts.dataset import DatasetInfo, SequenceDataModule, StreamWindows
from orchestrator.contracts.settings import Count

TEXT = "the quick brown fox jumps over the lazy dog. " * 200


class {cls}(SequenceDataModule):
    """Next-character prediction over ``text``: its characters are the vocabulary; the first 80%
    trains, the next 10% validates, the last 10% tests, each cut into ``batch_size`` rows read in
    windows of ``bptt`` characters (a stream: the state is carried from window to window)."""

    #: small settings for ``orch plugins check``
    quick_check_settings = {{"text": TEXT[:900]}}

    def __init__(self, text: str = TEXT, batch_size: Count = 4, bptt: Count = 16):
        super().__init__()
        self.text, self.batch_size, self.bptt = text, batch_size, bptt
        chars = sorted(set(text))
        self.index = {{c: i for i, c in enumerate(chars)}}
        ids = torch.tensor([self.index[c] for c in text], dtype=torch.long)
        n = len(ids)
        cut = int(0.8 * n), int(0.9 * n)
        self.splits = {{"train": ids[:cut[0]], "val": ids[cut[0]:cut[1]], "test": ids[cut[1]:]}}
        if min(len(s) for s in self.splits.values()) < 2 * batch_size:
            raise ValueError(f"{name}: a text of {{n}} characters is too short for batch_size {{batch_size}}")

    def describe(self) -> DatasetInfo:
        return DatasetInfo(task="language_model", layout="stream", vocab_size=len(self.index))

    def _loader(self, split: str) -> DataLoader:
        ids = self.splits[split]
        return DataLoader(StreamWindows(ids[:-1], ids[1:], self.batch_size, self.bptt), batch_size=None, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
'''

DATASET_TEST = '''
from orchestrator.testing import check_dataset

from {package} import TEXT, {cls}


def test_{name}_keeps_the_dataset_contract():
    check_dataset({cls}, text=TEXT[:900])  # splits, batches, windows that continue, seed


def test_{name}_vocabulary_is_the_text_s_characters():
    data = {cls}(text=TEXT[:900])
    assert data.describe().vocab_size == len(set(TEXT[:900]))
'''

DATASET_STUDY = '''
# A short study of a language model on the {name} dataset: `orch study run studies/{name}.yaml`
name: {name}_lm
seed: 0
dataset: {{plugin: {name}, batch_size: 4, bptt: 16}}
cell: {{plugin: lstm, hidden_size: 16}}
module: {{plugin: language_model, lr: 1.0, dropout: 0.0}}
trainer: {{max_epochs: 1, accelerator: cpu}}
study:
  metric: val_ppl
  direction: minimize
  trials: 2
  sampler: {{type: random, seed: 0}}
  space:
    module.lr: {{type: float, low: 0.3, high: 3.0, log: true}}
'''

MODULE = '''
"""{title}: a per-step classifier for orch with label smoothing (``module: {{plugin: {name}}}``)."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from orchestrator.contracts.module import SequenceModule
from orchestrator.contracts.settings import Positive


class {cls}(SequenceModule):
    """The cell, then a linear head over the classes of every step; cross-entropy with label
    smoothing. Metrics: ``val_loss`` and ``val_acc`` (per step)."""

    tasks = ("step_classification",)
    metrics = ("loss", "acc")  # what summarize() returns; a study's study.metric is checked against them

    def __init__(self, cell, info, lr: Positive = 1e-2, smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1,
                 **kwargs):
        super().__init__(cell, info, lr=lr, **kwargs)
        self.smoothing = smoothing
        self.cell = cell.build(info.input_size)
        self.head = torch.nn.Linear(cell.hidden_size, info.num_classes)

    def forward(self, x, state):
        out, state = self.cell(x, state)
        return self.head(out), state

    def loss(self, pred, y):
        return F.cross_entropy(pred.flatten(0, 1), y.flatten(), label_smoothing=self.smoothing)

    def accumulate(self, acc, pred, y, loss):
        super().accumulate(acc, pred, y, loss)
        acc["correct"] += (pred.argmax(-1) == y).sum()

    def summarize(self, acc):
        return {{**super().summarize(acc), "acc": float(acc["correct"]) / max(acc["n"], 1)}}
'''

MODULE_TEST = '''
from orchestrator.testing import check_module

from {package} import {cls}


def test_{name}_keeps_the_module_contract():
    check_module({cls})  # builds, fits, carries the state, is seeded


def test_{name}_without_smoothing():
    check_module({cls}, smoothing=0.0)
'''

MODULE_STUDY = '''
# A short study of the {name} module on the echo task: `orch study run studies/{name}.yaml`
name: {name}_echo
seed: 0
dataset: {{plugin: echo, length: 3000, val_length: 600}}
cell: {{plugin: lstm, hidden_size: 8}}
module: {{plugin: {name}, lr: 0.02}}
trainer: {{max_epochs: 2, accelerator: cpu}}
study:
  metric: val_acc
  direction: maximize
  trials: 2
  sampler: {{type: random, seed: 0}}
  space:
    module.smoothing: {{type: float, low: 0.0, high: 0.3}}
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "orch-{name}"
version = "0.1.0"
description = "{title}: an orch {kind} plugin"
requires-python = ">=3.10"
dependencies = ["orch"]

[project.optional-dependencies]
test = ["pytest>=8"]

# the entry point is how orch finds the plugin: group orch.{kind}s, name = the name in study files
[project.entry-points."orch.{kind}s"]
{name} = "{package}:{cls}"

[tool.setuptools.packages.find]
where = ["src"]
'''

README = '''
# orch-{name}

{title}: an orch {kind} plugin, registered under the entry-point group `orch.{kind}s` as `{name}`.

```bash
pip install -e ".[test]"    # into the environment that has orch
pytest                      # the contract kit: orchestrator.testing.check_{kind}
orch plugins check {name}  # the same checks, as orch runs them
orch study run studies/{name}.yaml  # a short study that uses it
```

Settings come from `__init__`'s keyword arguments: their type hints (with ranges, see
`orchestrator.contracts.settings`) are checked in every study file and `--set` before anything
runs. The package's name and version reach every MLflow run that uses the plugin (tags
`orch.{kind}.distribution`); raise the version when the plugin's behaviour changes. See orch's
`docs/plugins.md` for the contract and the lifecycle.
'''

FILES = {"cell": (CELL, CELL_TEST, CELL_STUDY), "dataset": (DATASET, DATASET_TEST, DATASET_STUDY),
         "module": (MODULE, MODULE_TEST, MODULE_STUDY)}


def new_plugin(kind: str, name: str, folder: str | Path) -> Path:
    """Write the package ``orch-NAME`` for a ``kind`` plugin into ``folder``; returns its path."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", name):
        raise ValueError(f"plugin name {shown(name)}: use 1 to 40 lower-case letters, digits and _, starting with "
                         "a letter")
    root = Path(folder) / f"orch-{name}"
    if root.exists() or root.is_symlink():
        raise FileExistsError(f"{root} exists already")
    try:
        _write(kind, name, root)
    except OSError as exc:
        raise ValueError(f"cannot write the plugin package {root}: {exc.strerror or exc}") from None
    return root


def _write(kind: str, name: str, root: Path) -> None:
    values = {"name": name, "kind": kind, "package": f"orch_{name}",
              "cls": "".join(part.capitalize() for part in name.split("_")) or name,
              "title": name.replace("_", " ").capitalize()}
    code, test, study = FILES[kind]
    for path, text in ((root / "pyproject.toml", PYPROJECT), (root / "README.md", README),
                       (root / "src" / values["package"] / "__init__.py", code),
                       (root / "tests" / f"test_{name}.py", test), (root / "studies" / f"{name}.yaml", study)):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as f:  # a new file in a new folder: never through a link
            f.write(textwrap.dedent(text).lstrip("\n").format(**values))

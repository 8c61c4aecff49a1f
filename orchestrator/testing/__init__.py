"""Contract checks plugin authors run in their own tests (as Optuna ships ``optuna.testing``).

One call per kind, each raising :class:`ContractError` (an ``AssertionError``) that names the rule
a plugin broke, what was seen, and how to fix it::

    from orchestrator.testing import check_cell, check_dataset, check_module

    def test_gru_keeps_the_cell_contract():
        check_cell(GRU)                                    # shapes, state, gradients, carry, seed

    def test_chars_keeps_the_dataset_contract():
        check_dataset(Chars, text="hello world " * 50)     # splits, batches, windows, seed

    def test_module_keeps_the_module_contract():
        check_module(MyModule, lr=0.1)                     # build, one fit, state carried, seed

The rules of each kind are listed in :mod:`orchestrator.testing.cells`,
:mod:`orchestrator.testing.datasets` and :mod:`orchestrator.testing.modules`.
"""

from orchestrator.testing.cells import check_cell
from orchestrator.testing.datasets import check_datamodule, check_dataset
from orchestrator.testing.modules import check_module
from orchestrator.testing.rules import ContractError

__all__ = ["ContractError", "check_cell", "check_dataset", "check_datamodule", "check_module"]

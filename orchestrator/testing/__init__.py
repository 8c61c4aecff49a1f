"""Contract checks plugin authors can run against their own plugins (as Optuna ships ``optuna.testing``).

Example, in a third-party package's tests::

    from orchestrator.testing.cells import check_cell
    from my_package import GRU

    def test_gru_contract():
        check_cell(GRU, hidden_size=8)
"""

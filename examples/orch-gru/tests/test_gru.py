from orch_gru import Gru

from orchestrator.testing import check_cell


def test_gru_keeps_the_cell_contract():
    check_cell(Gru)  # shapes, state, gradients through the state, chunks = one pass, seed


def test_gru_with_two_layers_and_dropout():
    check_cell(Gru, hidden_size=6, dropout=0.2)

"""Plugin discovery: isolation of broken plugins, clear lookup errors, `orch plugins list`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orchestrator import registry

THIRD_PARTY = """
[orch.cells]
gru = thirdparty_cells:GRU
missing = thirdparty_nowhere:Cell
not_a_cell = thirdparty_cells:helper
"""

CELLS_SRC = """
import torch
from orchestrator.contracts.cell import Cell

class GRU(Cell):
    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0):
        super().__init__(input_size, hidden_size, num_layers, dropout)
        self.rnn = torch.nn.GRU(input_size, hidden_size, num_layers, batch_first=True)

    def init_state(self, batch_size, device=None):
        return (torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device),)

    def forward(self, x, state):
        out, h = self.rnn(x, state[0])
        return out, (h,)

def helper():
    return 1
"""


def test_first_party_plugins_come_through_entry_points():
    found = {(p.kind, p.name): p for p in registry.discover_all(refresh=True)}
    for key in [("cells", "rnn"), ("cells", "lstm"), ("cells", "diy_lstm"), ("datasets", "ptb"),
                ("datasets", "sum_game"), ("datasets", "echo"), ("modules", "language_model"),
                ("modules", "step_regression"), ("modules", "step_classification")]:
        assert found[key].status == "ok", found[key].error
        assert found[key].distribution == "orch"


def test_broken_plugins_are_reported_and_isolated(fake_dist):
    fake_dist("thirdparty-cells", THIRD_PARTY, {"thirdparty_cells": CELLS_SRC}, version="2.3")
    cells = registry.discover("cells", refresh=True)
    assert cells["gru"].status == "ok" and cells["gru"].version == "2.3"
    assert cells["gru"].distribution == "thirdparty-cells"
    assert cells["missing"].status == "broken"
    assert "ModuleNotFoundError" in cells["missing"].error and "thirdparty_nowhere" in cells["missing"].error
    assert cells["not_a_cell"].status == "broken"
    assert "not a subclass of orchestrator.contracts.cell.Cell" in cells["not_a_cell"].error
    # the others keep working, including first-party ones
    assert registry.get("cells", "lstm").__name__ == "LSTMCell"
    assert registry.get("cells", "gru").__name__ == "GRU"
    with pytest.raises(registry.PluginError) as err:
        registry.get("cells", "missing")
    msg = str(err.value)
    assert "broken" in msg and "thirdparty-cells 2.3" in msg
    assert "available: diy_lstm, gru, lstm, rnn" in msg


def test_unknown_name_lists_available():
    with pytest.raises(registry.PluginError) as err:
        registry.get("cells", "transformer")
    assert str(err.value) == "unknown cell plugin 'transformer'; available: diy_lstm, lstm, rnn"
    with pytest.raises(registry.PluginError, match="kinds: cells, datasets, modules"):
        registry.discover("losses")


def test_third_party_cell_passes_the_contract_checks(fake_dist):
    from orchestrator.testing.cells import check_cell

    fake_dist("thirdparty-cells", THIRD_PARTY, {"thirdparty_cells": CELLS_SRC})
    check_cell(registry.get("cells", "gru"))


def test_plugins_list_json_in_a_real_process(fake_dist):
    root = fake_dist("thirdparty-cells", THIRD_PARTY, {"thirdparty_cells": CELLS_SRC})
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plugins", "list", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    by_name = {(r["kind"], r["name"]): r for r in rows}
    assert set(rows[0]) == {"kind", "name", "entry_point", "distribution", "version", "status", "error"}
    assert by_name[("cells", "gru")]["status"] == "ok"
    assert by_name[("cells", "missing")]["status"] == "broken"
    assert by_name[("cells", "missing")]["distribution"] == "thirdparty-cells"
    assert by_name[("modules", "language_model")] == {
        "kind": "modules", "name": "language_model", "entry_point": "orch_plugins.modules:LanguageModel",
        "distribution": "orch", "version": by_name[("modules", "language_model")]["version"],
        "status": "ok", "error": None}
    # the table form shows the broken plugin too
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plugins", "list"],
                          capture_output=True, text=True, env={**env, "COLUMNS": "200"}, timeout=120)
    assert proc.returncode == 0 and "missing" in proc.stdout and "broken" in proc.stdout


def test_help_imports_no_heavy_library():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "orchestrator.cli", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "study" in proc.stdout and "plugins" in proc.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    heavy = imported & {"torch", "pytorch_lightning", "lightning", "mlflow", "optuna"}
    assert not heavy, f"orch --help imported {heavy}"


LIST_AND_REPORT = """
import sys
from orchestrator.cli import main
try:
    main(["plugins", "list", "--json"])
except SystemExit as exc:
    assert not exc.code, exc.code
print("torch imported" if "torch" in sys.modules else "torch not imported", file=sys.stderr)
"""


@pytest.mark.slow  # seven real `orch plugins list` processes, about 27 s
def test_plugins_list_reads_its_cache_until_a_plugin_changes(fake_dist, tmp_path):
    # the cell imports a helper from a folder on the path that no distribution accounts for
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "thirdparty_helper.py").write_text("SIZE = 1\n")
    root = fake_dist("thirdparty-cells", THIRD_PARTY,
                     {"thirdparty_cells": "import thirdparty_helper\n" + CELLS_SRC})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(helpers), os.environ.get("PYTHONPATH", "")]),
           "ORCH_CACHE_DIR": str(tmp_path / "cache")}

    def listing():
        proc = subprocess.run([sys.executable, "-c", LIST_AND_REPORT], capture_output=True, text=True,
                              env=env, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return {(r["kind"], r["name"]): r for r in json.loads(proc.stdout)}, proc.stderr.strip().splitlines()[-1]

    first, imported = listing()
    assert imported == "torch imported" and first[("cells", "gru")]["status"] == "ok"
    again, imported = listing()
    assert imported == "torch not imported"  # the cached listing: no plugin, torch or Lightning import
    assert again == first
    # an edit of the helper that breaks the plugin is seen at once
    (helpers / "thirdparty_helper.py").write_text("raise ImportError('no helper today')\n")
    broken, imported = listing()
    assert imported == "torch imported"
    assert broken[("cells", "gru")]["status"] == "broken" and "no helper today" in broken[("cells", "gru")]["error"]
    (helpers / "thirdparty_helper.py").write_text("SIZE = 1\n")
    again, imported = listing()
    assert imported == "torch imported" and again[("cells", "gru")] == first[("cells", "gru")]
    assert {k: v["status"] for k, v in again.items()} == {k: v["status"] for k, v in first.items()}
    # so is an edit of the plugin's own module
    broken = CELLS_SRC.replace("import torch", "import torch\nraise ImportError('no GRU today')")
    (root / "thirdparty_cells.py").write_text(broken)
    broken, imported = listing()
    assert imported == "torch imported"
    assert broken[("cells", "gru")]["status"] == "broken" and "no GRU today" in broken[("cells", "gru")]["error"]
    # so is a newly installed distribution (a new dist-info in a folder on the path)
    info = root / "more_cells-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: more-cells\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[orch.cells]\nlstm2 = orch_plugins.cells:LSTMCell\n")
    more, imported = listing()
    assert imported == "torch imported" and more[("cells", "lstm2")]["distribution"] == "more-cells"
    assert {k: v for k, v in more.items() if k != ("cells", "lstm2")} == broken
    # and a module a plugin found missing, once it appears
    assert more[("cells", "missing")]["status"] == "broken" and listing()[1] == "torch not imported"
    (helpers / "thirdparty_nowhere.py").write_text("from orch_plugins.cells import LSTMCell as Cell\n")
    found, imported = listing()
    assert imported == "torch imported" and found[("cells", "missing")]["status"] == "ok"

"""The plugin-author kit: each contract check catches a plugin broken against its rule, and orch
itself refuses such a plugin (`orch plugins check`, `orch study run`)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.contracts.dataset import DatasetInfo, SequenceDataModule, StreamWindows
from orchestrator.testing import ContractError, check_cell, check_dataset, check_module

from helpers import echo_study, write

BROKEN = """
import torch
from torch.utils.data import DataLoader
from orch_plugins.cells import LSTMCell
from orch_plugins.modules import StepClassification
from orch_plugins.datasets.echo import Echo
from orchestrator.contracts.cell import Cell, detach_state


class WrongStateShape(LSTMCell):
    '''The state grows a step dimension: init_state's shape is not kept.'''
    def forward(self, x, state):
        out, (h, c) = super().forward(x, state)
        return out, (h.unsqueeze(0), c)


class DetachedState(LSTMCell):
    '''Detaches its state inside forward: truncated BPTT within a window breaks.'''
    def forward(self, x, state):
        return super().forward(x, detach_state(state))


class Nondeterministic(LSTMCell):
    '''Initialises from a generator of its own, not from torch's seeded one.'''
    def reset_parameters(self):
        super().reset_parameters()
        gen = torch.Generator().manual_seed(torch.seed() % 2**32)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(torch.rand(p.shape, generator=gen) * 1e-3)


class Shuffled(Echo):
    '''A stream served with its windows shuffled: row r of a batch no longer continues the batch before.'''
    def _loader(self, split):
        loader = super()._loader(split)
        return DataLoader(loader.dataset, batch_size=None, shuffle=True)


class UnsavedEpochState(StepClassification):
    '''Weighs each window by its place in the epoch, a count it keeps out of window_state().'''
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.place = 0

    def training_loss(self, loss, x):
        self.place = getattr(self, "place", 0) + 1
        return loss * self.place


class ForgetfulModule(StepClassification):
    '''Starts every window from a fresh state: it does not carry the state.'''
    def run_batch(self, x, key):
        self._states.pop(key, None)
        return super().run_batch(x, key)
"""

ENTRY_POINTS = """
[orch.cells]
wrong_state = broken_plugins:WrongStateShape
detached = broken_plugins:DetachedState
[orch.datasets]
shuffled = broken_plugins:Shuffled
[orch.modules]
forgetful = broken_plugins:ForgetfulModule
"""


@pytest.fixture
def broken(fake_dist):
    import importlib

    root = fake_dist("broken-plugins", ENTRY_POINTS, {"broken_plugins": BROKEN})
    return root, importlib.import_module("broken_plugins")


def rule_of(check, *args, **kwargs) -> str:
    with pytest.raises(ContractError) as err:
        check(*args, **kwargs)
    assert "fix:" in str(err.value)
    return err.value.rule


def test_each_kit_catches_the_rule_a_plugin_breaks(broken):
    _, plugins = broken
    assert rule_of(check_cell, plugins.WrongStateShape) == "cell.state_shape"
    assert rule_of(check_cell, plugins.DetachedState) == "cell.state_gradient"
    assert rule_of(check_cell, plugins.Nondeterministic) == "cell.deterministic"
    assert rule_of(check_cell, plugins.WrongStateShape, hidden_size=0) == "cell.settings"
    assert rule_of(check_dataset, plugins.Shuffled, length=3000, val_length=600) == "dataset.windows"
    assert rule_of(check_module, plugins.ForgetfulModule) == "module.carries_state"
    assert rule_of(check_module, plugins.UnsavedEpochState) == "module.resumable"  # a retry would train otherwise


class WrongSplits(SequenceDataModule):
    """Describes one validation set but serves two loaders."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def describe(self):
        return DatasetInfo(task="language_model", layout="stream", vocab_size=5)

    def _loader(self):
        g = torch.Generator().manual_seed(self.seed)
        tokens = torch.randint(0, 5, (61,), generator=g)
        return torch.utils.data.DataLoader(StreamWindows(tokens[:-1], tokens[1:], 2, 5), batch_size=None)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return [self._loader(), self._loader()]

    def test_dataloader(self):
        return self._loader()


class Unseeded(WrongSplits):
    """Draws its data from torch's global generator instead of its seed."""

    def val_dataloader(self):
        return self._loader()

    def _loader(self):
        if not hasattr(self, "_tokens"):
            self._tokens = torch.randint(0, 5, (61,))
        return torch.utils.data.DataLoader(StreamWindows(self._tokens[:-1], self._tokens[1:], 2, 5), batch_size=None)


def test_dataset_rules_for_splits_and_determinism():
    assert rule_of(check_dataset, WrongSplits) == "dataset.splits"
    assert rule_of(check_dataset, Unseeded) == "dataset.deterministic"
    assert rule_of(check_dataset, int) == "dataset.contract"


def test_orch_s_own_plugins_pass_their_kits():
    from orch_plugins.cells import DIYLSTMCell, LSTMCell, RNNCell
    from orch_plugins.datasets.echo import Echo
    from orch_plugins.datasets.sum_game import SumGame
    from orch_plugins.modules import LanguageModel, StepClassification, StepRegression

    for cell in (RNNCell, LSTMCell, DIYLSTMCell):
        check_cell(cell)
    check_cell(LSTMCell, forget_bias=1.0)
    check_dataset(Echo, length=3000, val_length=600)
    check_dataset(SumGame, length=4, long_lengths=[8], long_count=20)
    for module in (LanguageModel, StepRegression, StepClassification):
        check_module(module)


def test_orch_plugins_check_reports_and_study_run_refuses_a_broken_plugin(broken, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["plugins", "check", "--json", "lstm", "detached", "shuffled", "forgetful"])
    assert result.exit_code == 1, result.output
    report = {r["name"]: r for r in json.loads(result.stdout)}
    assert report["lstm"]["status"] == "ok"
    assert (report["detached"]["status"], report["detached"]["rule"]) == ("failed", "cell.state_gradient")
    assert report["shuffled"]["rule"] == "dataset.windows" and report["forgetful"]["rule"] == "module.carries_state"
    listed = CliRunner().invoke(main, ["plugins", "list", "--json"])
    assert {p["name"]: p["status"] for p in json.loads(listed.stdout)}["detached"] == "ok"  # it loads fine

    data = echo_study(space={"module.lr": {"type": "float", "low": 0.001, "high": 0.01}})
    data["cell"]["plugin"] = "detached"
    refused = CliRunner().invoke(main, ["study", "run", write(tmp_path / "tiny.yaml", data)])
    assert refused.exit_code == 2, refused.output
    assert "cell plugin 'detached'" in refused.stderr and "[cell.state_gradient]" in refused.stderr
    assert not (tmp_path / "mlruns").exists()


def test_importing_orch_does_not_take_the_name_plugins(tmp_path):
    import subprocess
    import sys

    code = "import importlib.util as u; print(u.find_spec('plugins')); import orch_plugins.cells"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"


def install(package, target):
    """Install a plugin package into its own folder (not into orch's environment)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(package)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def run_package(package, name, tmp_path, kind, trials="1"):
    """Its own tests, orch's check, and its study, with the package importable; returns the trial runs."""
    import subprocess
    import sys

    import mlflow

    from helpers import orch, runs_of

    site = tmp_path / "site"
    install(package, site)
    env = {"PYTHONPATH": str(site)}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=package,
                           capture_output=True, text=True, env={**__import__("os").environ, **env})
    assert tests.returncode == 0, tests.stdout + tests.stderr
    checked = orch("plugins", "check", "--json", name, cwd=tmp_path, env=env)
    assert checked.returncode == 0 and json.loads(checked.stdout)[0]["status"] == "ok", checked.stdout
    study = orch("study", "run", str(package / "studies" / f"{name}.yaml"), "--trials", trials, cwd=tmp_path, env=env)
    assert study.returncode == 0, study.stderr
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = json.loads(study.stdout)["study"]
    _, children = runs_of(client, experiment)
    assert len(children) == int(trials) and all(r.info.status == "FINISHED" for r in children)
    for r in children:
        assert r.data.tags[f"orch.{kind}"] == name
        assert r.data.tags[f"orch.{kind}.distribution"] == f"orch-{name}==0.1.0"
    return children


@pytest.mark.slow
@pytest.mark.parametrize("kind,name", [("cell", "gru2"), ("dataset", "chars"), ("module", "smooth")])
def test_plugins_new_writes_a_package_that_installs_passes_its_tests_and_runs_a_study(tmp_path, kind, name):
    made = CliRunner().invoke(main, ["plugins", "new", kind, name, "--dir", str(tmp_path)])
    assert made.exit_code == 0, made.output
    package = tmp_path / f"orch-{name}"
    assert {p.name for p in package.iterdir()} >= {"pyproject.toml", "README.md", "src", "tests", "studies"}
    run_package(package, name, tmp_path, kind)
    again = CliRunner().invoke(main, ["plugins", "new", kind, name, "--dir", str(tmp_path)])
    assert again.exit_code == 2 and "exists already" in again.stderr


@pytest.mark.slow
def test_the_example_third_party_package_installs_and_runs_a_two_trial_study(tmp_path):
    import shutil

    from helpers import REPO

    package = tmp_path / "orch-gru"
    shutil.copytree(REPO / "examples" / "orch-gru", package)
    runs = run_package(package, "gru", tmp_path, "cell", trials="2")
    assert {r.data.params["cell.hidden_size"] for r in runs} <= {"4", "8", "12", "16"}

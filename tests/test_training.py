"""Stateful TBPTT training: state carry and resets, parity with a plain loop, `orch train` end to end."""

from __future__ import annotations

import copy
import json

import pytest
import pytorch_lightning as pl
import torch
import yaml
from click.testing import CliRunner

from orch_plugins.cells import LSTMCell
from orch_plugins.datasets.echo import Echo
from orch_plugins.datasets.ptb import PTB
from orch_plugins.modules import LanguageModel, StepClassification
from orchestrator.cli import main
from orchestrator.contracts.module import CellSpec
from orchestrator.spec.run import RunSpec, load_spec
from orchestrator.testing.reference import plain_tbptt
from orchestrator.training import fit as runner


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def echo_run(tmp_path, **trainer):
    return {
        "seed": 0,
        "dataset": {"plugin": "echo", "length": 6000, "val_length": 2000},
        "cell": {"plugin": "lstm", "hidden_size": 16},
        "module": {"plugin": "step_classification", "lr": 0.01},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", **trainer},
    }


class StateProbe(pl.Callback):
    """Records the training state the module holds around every batch and around validation."""

    def __init__(self):
        self.before, self.after, self.around_val = [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        s = module._states.get("train")
        self.before.append((trainer.current_epoch, batch_idx, None if s is None else copy.deepcopy(s)))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append(module._states["train"])

    def on_validation_start(self, trainer, module):
        self.around_val.append(copy.deepcopy(module._states.get("train")))

    def on_validation_end(self, trainer, module):
        self.around_val.append(copy.deepcopy(module._states.get("train")))


def test_state_is_carried_detached_reset_each_epoch_and_untouched_by_validation(tmp_path):
    spec, _ = load_spec(write_yaml(tmp_path / "echo.yaml", echo_run(tmp_path, val_check_interval=20)))
    probe = StateProbe()
    runner.fit(spec, callbacks=[probe])
    assert len(probe.after) == 2 * 80  # 6000 bits / 5 rows / 15 steps = 80 windows per epoch
    for i, (epoch, batch_idx, before) in enumerate(probe.before):
        if batch_idx == 0:
            assert before is None, f"state not reset at the start of epoch {epoch}"
        else:  # the state a batch starts from is exactly where the previous batch ended
            prev = probe.after[i - 1]
            assert all(torch.equal(a, b) for a, b in zip(before, prev))
            assert all(not t.requires_grad for t in prev), "state not detached at the window boundary"
    # validation ran mid-epoch (every 20 batches) and left the training state as it was
    assert len(probe.around_val) >= 8
    for start, end in zip(probe.around_val[::2], probe.around_val[1::2]):
        assert (start is None and end is None) or all(torch.equal(a, b) for a, b in zip(start, end))


class ResetEveryBatch(StepClassification):
    """What a broken implementation would do: forget the state at every window."""

    def run_batch(self, x, key):
        self.reset_states(key)
        return super().run_batch(x, key)


def window_start_accuracy(module, datamodule, echo_step=3):
    module.eval()
    hits = total = 0
    module.reset_states("probe")
    with torch.no_grad():
        for x, y in datamodule.val_dataloader():
            pred = module.run_batch(x, "probe").argmax(-1)
            hits += (pred[:, :echo_step] == y[:, :echo_step]).sum().item()
            total += y[:, :echo_step].numel()
    return hits / total


def test_echo_needs_the_carried_state():
    """Echo's first steps of each window can only be right with the state carried across windows."""
    results = {}
    for cls in (StepClassification, ResetEveryBatch):
        pl.seed_everything(0, verbose=False)
        dm = Echo(length=10000, val_length=2000)
        module = cls(cell=CellSpec("lstm", LSTMCell, {"hidden_size": 16}), info=dm.describe(), lr=0.01)
        trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=dm)
        results[cls.__name__] = window_start_accuracy(module, dm)
    assert results["StepClassification"] >= 0.97
    assert results["ResetEveryBatch"] <= 0.75  # guessing, about 0.5: the test can tell them apart


def test_first_training_losses_equal_a_plain_pytorch_loop(corpus):
    folder, sums = corpus
    dm = PTB(data_dir=str(folder), checksums=sums, batch_size=4, bptt=7)
    info = dm.describe()

    def make():
        torch.manual_seed(0)
        cell = CellSpec("lstm", LSTMCell, {"hidden_size": 12, "num_layers": 2})
        return LanguageModel(cell=cell, info=info, init_scale=0.1, lr=1.0, clip_grad_norm=5.0)

    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]) / batch[0].shape[1])  # back to per-token loss

    steps = 12
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[Record()])
    trainer.fit(make(), datamodule=dm)
    plain = plain_tbptt(make(), dm.train_dataloader(), max_steps=steps)
    assert len(losses) == plain["steps"] == steps
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain["losses"]), atol=1e-5, rtol=0)
    assert plain["losses"][-1] < plain["losses"][0]  # and it learns


def test_zaremba_lr_schedule_and_clipping(corpus):
    folder, sums = corpus
    dm = PTB(data_dir=str(folder), checksums=sums, batch_size=4, bptt=7)
    cell = CellSpec("lstm", LSTMCell, {"hidden_size": 8})
    module = LanguageModel(cell=cell, info=dm.describe(), lr=1.0, lr_decay=0.5, decay_after=2)
    lrs = []

    class Record(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[Record()])
    trainer.fit(module, datamodule=dm)
    assert lrs == [1.0, 1.0, 0.5, 0.25, 0.125]


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU: the streams then move from the host to it"))])
def test_every_stream_a_fit_reads_is_on_the_module_s_device(corpus, accelerator):
    from orchestrator.training.callbacks import _loaders

    folder, sums = corpus
    dm = PTB(data_dir=str(folder), checksums=sums, batch_size=4, eval_batch_size=3, bptt=7)
    seen = []

    class Probe(pl.Callback):  # runs after orch's own callbacks: what the steps will read
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 0:
                seen.append(("train", module.device, [dl.dataset.x.device for dl in _loaders(trainer.train_dataloader)],
                             batch[0].device))

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 0:
                seen.append(("val", module.device, [dl.dataset.x.device for dl in _loaders(trainer.val_dataloaders)],
                             batch[0].device))

    torch.manual_seed(0)
    module = LanguageModel(cell=CellSpec("lstm", LSTMCell, {"hidden_size": 8}), info=dm.describe())
    spec = RunSpec.model_validate({"dataset": {"plugin": "ptb"}, "cell": {"plugin": "lstm"},
                                   "module": {"plugin": "language_model"},
                                   "trainer": {"max_epochs": 1, "accelerator": accelerator}})
    trainer = runner.make_trainer(spec, callbacks=[Probe()], limit_train_batches=3, limit_val_batches=2)
    trainer.fit(module, datamodule=dm)
    assert [s[0] for s in seen] == ["train", "val"]
    for _, device, streams, batch_device in seen:
        assert streams and all(d == device for d in streams) and batch_device == device
    # the windows are the same as read from the host
    host = dm.train_dataloader().dataset
    on_device = trainer.train_dataloader.dataset
    for k in range(len(host)):
        assert torch.equal(on_device[k][0].cpu(), host[k][0]) and torch.equal(on_device[k][1].cpu(), host[k][1])


GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="needs a GPU: CUDA graphs capture CUDA kernels only")


@pytest.mark.parametrize("accelerator, cell_cls", [
    ("cpu", "lstm"),  # nothing is captured: the setting changes nothing off a GPU
    pytest.param("gpu", "lstm", marks=GPU_ONLY), pytest.param("gpu", "diy_lstm", marks=GPU_ONLY)])
def test_cuda_graphed_windows_train_as_eager_ones(corpus, accelerator, cell_cls):
    """Two fits of the same module, two epochs each with validation between them, the state carried,
    the last window of each epoch shorter: the losses with the windows replayed as a CUDA graph are
    those of eager training (on a CPU nothing is captured). The second fit starts after Lightning
    has moved the module off the GPU and back: its graph must be captured again, never replayed
    against the first fit's parameter memory."""
    from orch_plugins.cells import DIYLSTMCell

    folder, sums = corpus
    dm = PTB(data_dir=str(folder), checksums=sums, batch_size=4, eval_batch_size=3, bptt=9)
    info = dm.describe()
    windows = len(dm.train_dataloader())
    assert dm.train_dataloader().dataset[windows - 1][0].shape[1] < 9  # the last window is shorter
    runs = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        cell = CellSpec(cell_cls, {"lstm": LSTMCell, "diy_lstm": DIYLSTMCell}[cell_cls],
                        {"hidden_size": 16, "num_layers": 2})
        module = LanguageModel(cell=cell, info=info, init_scale=0.1, cuda_graphs=graphs)
        losses, val, captured = [], [], []

        class Record(pl.Callback):
            def __init__(self, losses, val, captured):
                self.losses, self.val, self.captured = losses, val, captured

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                self.losses.append(float(outputs["loss"]) / batch[0].shape[1])

            def on_train_epoch_end(self, trainer, module):
                held = module._graphs
                self.captured.append(None if held is None else (held.failed, len(held._graphs)))

            def on_validation_end(self, trainer, module):
                self.val.append(float(trainer.callback_metrics["val_loss"]))

        spec = RunSpec.model_validate({"dataset": {"plugin": "ptb"}, "cell": {"plugin": cell_cls},
                                       "module": {"plugin": "language_model"},
                                       "trainer": {"max_epochs": 2, "accelerator": accelerator}})
        for _ in range(2):
            trainer = runner.make_trainer(spec, callbacks=[Record(losses, val, captured)], limit_val_batches=2,
                                          num_sanity_val_steps=0, enable_progress_bar=False)
            trainer.fit(module, datamodule=dm)
            assert module._graphs is None  # dropped with the fit, and its memory with it
        runs[graphs] = (losses, val, captured)
    # on a GPU, one graph in each epoch of each fit and no failed capture; on a CPU, none at all
    assert runs[True][2] == ([(None, 1)] * 4 if accelerator == "gpu" else [None] * 4)
    assert runs[False][2] == [None] * 4
    assert len(runs[True][0]) == len(runs[False][0]) == 2 * 2 * windows and len(runs[True][1]) == 4
    torch.testing.assert_close(torch.tensor(runs[True][0]), torch.tensor(runs[False][0]), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(runs[True][1]), torch.tensor(runs[False][1]), atol=2e-4, rtol=1e-4)
    assert runs[True][0][-1] < runs[True][0][0]  # and it learns


def test_tied_weights_share_one_matrix_that_both_ends_train(corpus):
    folder, sums = corpus
    dm = PTB(data_dir=str(folder), checksums=sums, batch_size=4, bptt=7)
    info = dm.describe()
    torch.manual_seed(0)
    cell = CellSpec("lstm", LSTMCell, {"hidden_size": 12})
    tied = LanguageModel(cell=cell, info=info, tie_weights=True, init_scale=0.1)
    untied = LanguageModel(cell=cell, info=info, init_scale=0.1)
    assert tied.decoder.weight is tied.embedding.weight
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) - n(tied) == info.vocab_size * 12  # one vocab x hidden matrix fewer
    # a step moves the shared matrix by the gradients of both the embedding and the decoder
    x, y = next(iter(dm.train_dataloader()))
    out, _ = tied(x, tied.cell.init_state(x.shape[0]))
    torch.nn.functional.cross_entropy(out.reshape(-1, info.vocab_size), y.reshape(-1)).backward()
    grad = tied.embedding.weight.grad
    unseen = sorted(set(range(info.vocab_size)) - set(x.flatten().tolist()))
    assert grad[unseen].abs().sum() > 0  # rows of words not in the input still learn, through the decoder
    with pytest.raises(ValueError, match="tie_weights needs embedding_size == hidden_size"):
        LanguageModel(cell=cell, info=info, tie_weights=True, embedding_size=8)


def test_incompatible_dataset_and_module_fail_before_training(tmp_path):
    data = echo_run(tmp_path)
    data["module"] = {"plugin": "language_model"}
    result = CliRunner().invoke(main, ["train", write_yaml(tmp_path / "bad.yaml", data),
                                       "--tracking-uri", str(tmp_path / "mlruns")])
    assert result.exit_code == 2
    assert not (tmp_path / "mlruns").exists()  # nothing written
    assert "module 'language_model' trains language_model, but dataset 'echo' is a step_classification task" \
        in result.output
    assert "modules that fit it: step_classification" in result.output


def test_missing_data_is_one_message_and_writes_nothing(tmp_path, monkeypatch):
    data = echo_run(tmp_path)
    data["dataset"] = {"plugin": "ptb", "data_dir": str(tmp_path / "nowhere")}
    data["module"] = {"plugin": "language_model"}
    monkeypatch.chdir(tmp_path)
    for args in (["train"], ["study", "run"]):
        data["study"] = {"metric": "val_ppl", "direction": "minimize", "trials": 1}
        result = CliRunner().invoke(main, [*args, write_yaml(tmp_path / "ptb.yaml", data)])
        assert result.exit_code == 2, result.output
        assert "ptb.train.txt" in result.stderr and "data_dir" in result.stderr
        assert not (tmp_path / "mlruns").exists()


def test_orch_train_logs_params_epoch_metrics_tags_and_config(tmp_path):
    import mlflow

    path = write_yaml(tmp_path / "echo.yaml", echo_run(tmp_path))
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["train", path, "--tracking-uri", uri, "--set", "cell.hidden_size=12",
                                       "--set", "trainer.max_epochs=3"])
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("echo")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["cell.hidden_size"] == "12" and run.data.params["dataset.plugin"] == "echo"
    assert run.data.params["trainer.max_epochs"] == "3"
    assert run.data.tags["orch.cell"] == "lstm" and run.data.tags["orch.device"] == "cpu"
    assert run.data.tags["orch.module.distribution"].startswith("orch==")
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in history] == [0, 1, 2]
    assert {"train_loss", "val_loss", "lr", "tokens_per_s"} <= set(run.data.metrics)
    config = yaml.safe_load(open(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="config.yaml", tracking_uri=uri)))
    assert config["cell"] == {"plugin": "lstm", "hidden_size": 12}
    assert '"val_acc"' in result.output


def test_failed_run_is_marked_failed_with_traceback(tmp_path):
    import mlflow

    data = echo_run(tmp_path)
    data["dataset"] = {"plugin": "sum_game", "long_count": 10}
    # a squared error under a huge SGD step overflows to inf within a few steps
    data["module"] = {"plugin": "step_regression", "optimizer": "sgd", "lr": 1000, "nan_check_every": 1}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["train", write_yaml(tmp_path / "nan.yaml", data), "--tracking-uri", uri])
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    if result.exit_code == 0:
        pytest.fail(f"a diverging run finished: {result.output}")
    assert result.exit_code == 1 and "NonFiniteLossError" in result.output
    assert run.info.status == "FAILED" and "train_loss became" in run.data.tags["orch.error"]
    text = open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="traceback.txt",
                                                    tracking_uri=uri)).read()
    assert "NonFiniteLossError" in text


def test_shipped_echo_study_reaches_099(tmp_path):
    """Acceptance: `orch train studies/echo.yaml` on its default settings."""
    result = CliRunner().invoke(main, ["train", "studies/echo.yaml", "--tracking-uri", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["val_acc"] >= 0.99


def test_shipped_sum_game_study_reaches_099_and_reports_long_acc(tmp_path):
    """Acceptance: `orch train studies/sum_game.yaml` on its default settings."""
    result = CliRunner().invoke(main, ["train", "studies/sum_game.yaml", "--tracking-uri", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["val_acc"] >= 0.99
    assert 0.0 <= metrics["long_acc"] <= 1.0 and "long_step_acc" in metrics

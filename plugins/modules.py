"""First-party modules: ``language_model``, ``step_regression``, ``step_classification``.

Each is a :class:`~orchestrator.contracts.module.SequenceModule`: the stateful TBPTT loop, the
epoch-level metrics and the optimiser come from there; a module adds its layers and its loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.contracts.dataset import DatasetInfo
from orchestrator.contracts.module import CellSpec, Optimizer, SequenceModule
from orchestrator.contracts.settings import Count, Index, LearningRate, Positive, Probability


class LanguageModel(SequenceModule):
    """Embedding, cell, dropout, linear decoder over the vocabulary (Zaremba et al. 2014).

    The defaults are Zaremba's "small" configuration: SGD at lr 1, halved after epoch 4, gradient
    norm clipped at 5, weights uniform in ±0.1. As in that paper, the backpropagated loss is the
    cross-entropy summed over the window's steps and averaged over the batch, so the learning
    rates of the paper carry over. Metrics: ``train_loss`` (per token), ``val_loss``, ``val_ppl``,
    ``test_loss``, ``test_ppl`` (exp of the token-weighted mean loss over the split), ``lr``,
    ``tokens_per_s``.

    Args:
        dropout: dropout on the embedding output and on the cell output.
        tie_weights: share the embedding and decoder weights (needs embedding size = hidden size).
        embedding_size: defaults to the cell's hidden size.
    """

    tasks = ("language_model",)
    metrics = ("loss", "ppl")

    def __init__(self, cell: CellSpec, info: DatasetInfo, dropout: Probability = 0.0, tie_weights: bool = False,
                 embedding_size: Count | None = None, lr: LearningRate = 1.0, optimizer: Optimizer = "sgd",
                 clip_grad_norm: Positive | None = 5.0, lr_decay: Positive = 0.5, decay_after: Index = 4,
                 init_scale: Positive | None = 0.1, **kwargs):
        super().__init__(cell, info, lr=lr, optimizer=optimizer, clip_grad_norm=clip_grad_norm,
                         lr_decay=lr_decay, decay_after=decay_after, init_scale=init_scale, **kwargs)
        emb = embedding_size or cell.hidden_size
        self.embedding = nn.Embedding(info.vocab_size, emb)
        self.cell = cell.build(emb)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(cell.hidden_size, info.vocab_size)
        if tie_weights:
            if emb != cell.hidden_size:
                raise ValueError(f"tie_weights needs embedding_size == hidden_size ({emb} != {cell.hidden_size})")
            self.decoder.weight = self.embedding.weight
        if init_scale is not None:
            for p in self.parameters():
                nn.init.uniform_(p, -init_scale, init_scale)
            self.cell.reset_parameters(init_scale)  # re-applies e.g. a forget-gate bias

    def forward(self, x, state):
        out, state = self.cell(self.drop(self.embedding(x)), state)
        return self.decoder(self.drop(out)), state

    def loss(self, pred, y):
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), y.reshape(-1))

    def training_loss(self, loss, x):
        return loss * x.shape[1]

    def reading(self, loss):
        return {"ppl": math.exp(min(loss, 700.0))}

    def summarize(self, acc):
        mean = float(acc["loss_sum"]) / acc["n"]
        return {"loss": mean, "ppl": math.exp(min(mean, 700.0))}


class _StepModule(SequenceModule):
    """A cell and a linear read-out at every step, for the per-step tasks."""

    out_features = 1
    unit = "step"  # one element: one step of one sequence

    def __init__(self, cell: CellSpec, info: DatasetInfo, lr: LearningRate = 1e-2, optimizer: Optimizer = "adam",
                 **kwargs):
        super().__init__(cell, info, lr=lr, optimizer=optimizer, **kwargs)
        self.cell = cell.build(info.input_size)
        self.head = nn.Linear(cell.hidden_size, self.out_features or info.num_classes)
        if self.init_scale is not None:
            nn.init.uniform_(self.head.weight, -self.init_scale, self.init_scale)
            self.cell.reset_parameters(self.init_scale)

    def forward(self, x, state):
        out, state = self.cell(x, state)
        return self.head(out), state


class StepRegression(_StepModule):
    """Per-step regression (the sum game): MSE on every step.

    Metrics per eval set: ``{set}_loss`` (MSE), ``{set}_acc`` (rounded prediction at the last step
    equals the target), ``{set}_step_acc`` (rounded prediction equals the target, over all steps).
    """

    tasks = ("step_regression",)
    metrics = ("loss", "acc", "step_acc")

    def forward(self, x, state):
        pred, state = super().forward(x, state)
        return pred.squeeze(-1), state

    def loss(self, pred, y):
        return F.mse_loss(pred, y)

    def accumulate(self, acc, pred, y, loss):
        super().accumulate(acc, pred, y, loss)
        hit = torch.round(pred) == y
        acc["seq_hits"] += hit[:, -1].sum()
        acc["seqs"] += y.shape[0]
        acc["step_hits"] += hit.sum()

    def summarize(self, acc):
        return {**super().summarize(acc), "acc": float(acc["seq_hits"]) / acc["seqs"],
                "step_acc": float(acc["step_hits"]) / acc["n"]}


class StepClassification(_StepModule):
    """Per-step classification (echo): cross-entropy on every step; ``{set}_acc`` over all steps."""

    tasks = ("step_classification",)
    metrics = ("loss", "acc")
    out_features = None  # one logit per class

    def loss(self, pred, y):
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), y.reshape(-1))

    def accumulate(self, acc, pred, y, loss):
        super().accumulate(acc, pred, y, loss)
        acc["hits"] += (pred.argmax(-1) == y).sum()

    def summarize(self, acc):
        return {**super().summarize(acc), "acc": float(acc["hits"]) / acc["n"]}

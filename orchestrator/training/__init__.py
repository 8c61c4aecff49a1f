"""One fit: build the plugins (:mod:`~orchestrator.training.build`), train them with Lightning
(:mod:`~orchestrator.training.fit`) under orch's callbacks (:mod:`~orchestrator.training.callbacks`),
keeping the checkpoints a retry resumes from (:mod:`~orchestrator.training.checkpoints`), with the
training window replayed as a CUDA graph on a GPU (:mod:`~orchestrator.training.graphs`).

These modules import torch and Lightning when loaded: the rest of orch imports them only where it
trains."""

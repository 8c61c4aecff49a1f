"""Worker slots: where each worker process of a study runs on this machine.

One slot per device: ``trials_per_device`` slots on each GPU (every visible one unless
``--devices``), else ``--workers`` CPU slots; the cores this process may use (its affinity mask and
cgroup CPU quota, or ``ORCH_CPUS``: :mod:`orchestrator.cpus`) are split between them for torch's threads.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.cpus import usable_cpus
from orchestrator.errors import UsageError


@dataclass(frozen=True)
class Slot:
    """Where one worker runs: a GPU id (``None`` for CPU) and its torch threads."""

    index: int
    gpu: int | None
    threads: int

    @property
    def device(self) -> str:
        return f"cuda:{self.gpu}" if self.gpu is not None else "cpu"


def plan_slots(*, accelerator: str, devices: list[int] | None, workers: int | None,
               trials_per_device: int, gpu_count: int, cpu_count: int) -> list[Slot]:
    """The worker slots: ``trials_per_device`` per GPU (all visible ones unless ``devices``), else CPU slots."""
    use_gpu = accelerator not in ("cpu",) and (devices or gpu_count)
    if use_gpu:
        ids = devices if devices else list(range(gpu_count))
        per = max(1, cpu_count // (len(ids) * trials_per_device))
        return [Slot(i, gpu, per) for i, gpu in enumerate(g for g in ids for _ in range(trials_per_device))]
    n = workers or 1
    return [Slot(i, None, max(1, cpu_count // n)) for i in range(n)]


def slots_for(study, devices: list[int] | None, workers: int | None, trials_per_device: int | None) -> list[Slot]:
    """This machine's slots for ``study`` (options given, else the file's ``study.resources``)."""
    accelerator = str(study.base.trainer.get("accelerator", "auto"))
    devices = devices or study.section.resources.devices
    gpu_count = 0
    if accelerator != "cpu":
        import torch

        gpu_count = torch.cuda.device_count()
        if devices and any(d >= gpu_count or d < 0 for d in devices):
            raise UsageError(f"devices {devices}: this machine has {gpu_count} visible GPU(s)")
    return plan_slots(accelerator=accelerator, devices=devices, workers=workers or study.section.resources.workers,
                      trials_per_device=trials_per_device or study.section.resources.trials_per_device,
                      gpu_count=gpu_count, cpu_count=usable_cpus().count)

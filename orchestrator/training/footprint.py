"""The memory a run's model needs, judged before anything is allocated.

The model is built on PyTorch's ``meta`` device (shapes only, no storage: milliseconds for any
size), its parameters counted, and the training footprint taken as four copies of them (the
weights, their gradients and the two moments of Adam; SGD needs fewer). A run whose footprint
exceeds the memory the device has (a GPU's total memory, or the machine's available memory for
the CPU) is refused with a message naming the size settings and the memory they need, instead of
a traceback from an allocation of petabytes. Activations come on top and depend on the batch and
window, so this is a floor: a run that passes can still run out of memory.
"""

from __future__ import annotations

import os

from orchestrator import registry
from orchestrator.contracts.module import CellSpec

#: copies of the parameters training holds: weights, gradients, Adam's two moments
COPIES = 4


def parameters(module_cls: type, cell_spec, info, settings: dict) -> tuple[int, int] | None:
    """The number of parameters of ``module_cls(cell=cell_spec, info=info, **settings)`` and their
    bytes, built on the meta device; ``None`` when the module cannot be built there (then nothing
    is judged)."""
    import torch

    try:
        with torch.device("meta"):
            module = module_cls(cell=cell_spec, info=info, **settings)
        params = list(module.parameters())
        return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)
    except Exception:  # noqa: BLE001 - a module that needs real tensors to build: not judged here
        return None


def device_bytes(trainer: dict) -> tuple[int, str] | None:
    """The memory a run on ``trainer``'s accelerator can use, and what it is, or ``None`` if unknown."""
    import torch

    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, f"GPU {torch.cuda.get_device_name(0)}"
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/meminfo") as f:  # MemAvailable counts the caches the kernel would give back
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return available, "the machine's available memory"


def too_big(spec, info) -> str | None:
    """Why ``spec``'s model (on its dataset, described by ``info``) cannot train on this machine's
    device, or ``None``."""
    cell = CellSpec(spec.cell.plugin, registry.get("cells", spec.cell.plugin), spec.cell.settings)
    counted = parameters(registry.get("modules", spec.module.plugin), cell, info, spec.module.settings)
    have = device_bytes(spec.trainer)
    if counted is None or have is None or counted[1] * COPIES <= have[0]:
        return None
    n, size = counted
    sizes = ", ".join(f"{section}.{k} = {v}" for section in ("cell", "module")
                      for k, v in getattr(spec, section).settings.items()
                      if isinstance(v, int) and not isinstance(v, bool) and v > 1) or "its settings"
    return (f"the model ({sizes}) has {n:,} parameters: training needs at least {_gb(size * COPIES)} "
            f"for them, their gradients and the optimiser's state, and {have[1]} is {_gb(have[0])}")


def _gb(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"

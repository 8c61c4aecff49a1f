"""The contracts plugin authors implement, one per entry-point group.

=================  ==========================================  ==================================
group              contract                                    module
=================  ==========================================  ==================================
``orch.cells``     :class:`~orchestrator.contracts.cell.Cell`          ``contracts/cell.py``
``orch.datasets``  :class:`~orchestrator.contracts.dataset.SequenceDataModule`  ``contracts/dataset.py``
``orch.modules``   :class:`~orchestrator.contracts.module.SequenceModule`   ``contracts/module.py``
=================  ==========================================  ==================================

Each contract lives in its own module so that importing one (for example the cell contract,
which needs only torch) does not pull in Lightning.
"""

from __future__ import annotations

# entry-point group -> (module, class name) of the contract its plugins must subclass
CONTRACTS: dict[str, tuple[str, str]] = {
    "orch.cells": ("orchestrator.contracts.cell", "Cell"),
    "orch.datasets": ("orchestrator.contracts.dataset", "SequenceDataModule"),
    "orch.modules": ("orchestrator.contracts.module", "SequenceModule"),
}

KINDS: dict[str, str] = {"cells": "orch.cells", "datasets": "orch.datasets", "modules": "orch.modules"}

# section of a run or study file -> the kind of plugin it names
SECTIONS: dict[str, str] = {"dataset": "datasets", "cell": "cells", "module": "modules"}

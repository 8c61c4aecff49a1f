"""Setting types with their valid ranges, for plugin ``__init__`` signatures.

orch reads a plugin's settings from its ``__init__`` signature: the names, the defaults, and the
type hints, which are checked (pydantic) against every value of a run file, a study's search
space (at both ends of each range) and ``--set``, before anything runs. A hint may carry a
range with ``typing.Annotated`` and ``pydantic.Field``; these are the ones orch's own plugins
use, and any plugin may::

    from orchestrator.contracts.settings import Count, Probability

    class GRU(Cell):
        def __init__(self, input_size: int, hidden_size: Count, num_layers: Count = 1,
                     dropout: Probability = 0.0): ...

A value out of range is reported with its file and line (or ``--set``), the key and the range.
Every float setting must also be finite: ``.inf`` and ``.nan`` are refused for any setting.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

#: a size, a number of layers, a batch size: an int >= 1
Count = Annotated[int, Field(ge=1)]
#: an int >= 0 (an epoch number, an offset)
Index = Annotated[int, Field(ge=0)]
#: a float > 0 (a learning rate, a scale)
Positive = Annotated[float, Field(gt=0)]
#: a float >= 0 (a penalty)
NonNegative = Annotated[float, Field(ge=0)]
#: a dropout probability: 0 <= p < 1
Probability = Annotated[float, Field(ge=0, lt=1)]
#: a learning rate: 0 < lr <= 1000 (past that every step diverges)
LearningRate = Annotated[float, Field(gt=0, le=1000)]
#: a random seed: an int in NumPy's and Optuna's range, 0 <= seed <= 2**31 - 1 (not a bool)
Seed = Annotated[int, Field(ge=0, le=2**31 - 1, strict=True)]

"""The search space of a study: its parameters, ``when`` conditions, and the sets of values a
trial can take (what a sampler suggests, a grid's points, the corners the file check tries).

Parameters are sampled in the order written; ``when`` makes a parameter exist only when earlier
(or fixed) settings take one of the listed values.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.errors import SpecError
from orchestrator.spec.files import Source, pydantic_error

if TYPE_CHECKING:  # for the annotations only: spec.study builds on this module
    from orchestrator.spec.study import StudySection


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid")
    when: dict[str, list[Any]] | None = None


class IntParam(_Param):
    type: Literal["int"]
    low: int
    high: int
    step: int = 1
    log: bool = False

    @model_validator(mode="after")
    def _check(self):
        _check_range(self.low, self.high, self.log, self.step)
        if self.log and self.step != 1:
            raise ValueError("log and step cannot be combined")
        return self

    def grid(self) -> list[int]:
        if self.log:
            raise ValueError("the grid sampler cannot enumerate a log range; use a categorical")
        return list(range(self.low, self.high + 1, self.step))


class FloatParam(_Param):
    type: Literal["float"]
    low: float
    high: float
    step: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _check(self):
        _check_range(self.low, self.high, self.log, self.step)
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    def grid(self) -> list[float]:
        if self.step is None:
            raise ValueError("the grid sampler needs a step (or choices) for a float")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]


class CategoricalParam(_Param):
    type: Literal["categorical"]
    choices: list[Union[None, bool, int, float, str]] = Field(min_length=1)

    def grid(self) -> list:
        return list(self.choices)


def _check_range(low, high, log, step):
    if low > high:
        raise ValueError(f"low ({low}) is greater than high ({high})")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0 (got {low})")
    if step is not None and step <= 0:
        raise ValueError(f"step must be > 0 (got {step})")
    if step is not None and step > high - low and high != low:
        raise ValueError(f"step ({step}) is larger than the range {low}..{high}")


Param = Union[IntParam, FloatParam, CategoricalParam]


def parse_space(space: dict[str, Any], src: Source) -> dict[str, Param]:
    if not isinstance(space, dict):
        raise SpecError(f"{src.where('study.space')}: study.space must be a mapping of dotted keys")
    kinds = {"int": IntParam, "float": FloatParam, "categorical": CategoricalParam}
    out: dict[str, Param] = {}
    for key, raw in space.items():
        where = f"study.space.{key}"
        if not isinstance(raw, dict) or raw.get("type") not in kinds:
            raise src.error(where, f"{where} needs type: one of {', '.join(kinds)}")
        try:
            out[key] = kinds[raw["type"]].model_validate(raw)
        except ValidationError as exc:
            raise pydantic_error(exc, src, where) from None
    return out


def lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def resolve_params(section: StudySection, pick, base: dict[str, Any]) -> dict[str, Any]:
    """The active parameters, in space order: ``pick(key, param)`` gives each value, and a
    parameter whose ``when`` condition fails (on earlier or fixed settings) is left out."""
    active: dict[str, Any] = {}
    for key, p in section.space.items():
        if p.when and not all((active[k] if k in active else lookup(base, k)) in allowed
                              for k, allowed in p.when.items()):
            continue
        active[key] = pick(key, p)
    return active


def corners(section: StudySection, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Parameter sets covering every combination of categorical choices, each with all ranges
    at their low ends and at their high ends."""
    cats = [k for k, p in section.space.items() if isinstance(p, CategoricalParam)]
    combos = []
    for choice in itertools.product(*(section.space[k].choices for k in cats)):
        chosen = dict(zip(cats, choice))
        for end in ("low", "high"):
            def pick(key, param, chosen=chosen, end=end):
                return chosen[key] if key in chosen else getattr(param, end)

            combos.append(resolve_params(section, pick, base))
    return combos


def suggest(trial, section: StudySection, base: dict[str, Any]) -> dict[str, Any]:
    """Sample the active parameters of ``trial`` (define-by-run, honouring ``when``)."""

    def pick(key, p):
        if isinstance(p, CategoricalParam):
            return trial.suggest_categorical(key, p.choices)
        if isinstance(p, IntParam):
            return trial.suggest_int(key, p.low, p.high, step=p.step, log=p.log)
        return trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)

    return resolve_params(section, pick, base)


def grid_points(section: StudySection) -> dict[str, list]:
    return {k: p.grid() for k, p in section.space.items()}


def grid_size(section: StudySection) -> int | None:
    """Number of points of a grid study (``None`` for other samplers)."""
    if section.sampler.type != "grid":
        return None
    return math.prod(len(v) for v in grid_points(section).values())

"""The search space of a study: its parameters, ``when`` conditions, and the sets of values a
trial can take (what a sampler suggests, a grid's points, the corners the file check tries).

Parameters are sampled in the order written; ``when`` makes a parameter exist only when earlier
(or fixed) settings take one of the listed values.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.errors import SpecError
from orchestrator.spec.files import Source, pydantic_error

if TYPE_CHECKING:  # for the annotations only: spec.study builds on this module
    from orchestrator.spec.study import StudySection


#: parameters in a space, choices of one categorical and of all together, points of a grid
MAX_PARAMS = 64
MAX_CHOICES = 256
MAX_ALL_CHOICES = 1024
MAX_GRID = 100_000


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    when: dict[str, list[Any]] | None = Field(default=None, max_length=16)


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

    def grid_len(self) -> int:
        """How many points :meth:`grid` has, computed without making them."""
        if self.log:
            raise ValueError("the grid sampler cannot enumerate a log range; use a categorical")
        return (self.high - self.low) // self.step + 1

    def grid(self) -> list[int]:
        self.grid_len()
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

    def grid_len(self) -> int:
        """How many points :meth:`grid` has, computed without making them."""
        if self.step is None:
            raise ValueError("the grid sampler needs a step (or choices) for a float")
        n = (self.high - self.low) / self.step + 1e-9
        return int(math.floor(n)) + 1 if math.isfinite(n) and n < 2**62 else 2**62

    def grid(self) -> list[float]:
        n = self.grid_len() - 1
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]


class CategoricalParam(_Param):
    type: Literal["categorical"]
    choices: list[Union[None, bool, int, float, Annotated[str, Field(max_length=200)]]] = Field(
        min_length=1, max_length=MAX_CHOICES)

    def grid_len(self) -> int:
        return len(self.choices)

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
    if len(space) > MAX_PARAMS:
        raise SpecError(f"{src.where('study.space')}: {len(space)} searched settings; at most {MAX_PARAMS}")
    out: dict[str, Param] = {}
    for key, raw in space.items():
        where = f"study.space.{key}"
        if not isinstance(raw, dict) or not isinstance(raw.get("type"), str) or raw["type"] not in kinds:
            raise src.error(where, f"{where} needs type: one of {', '.join(kinds)}")
        try:
            out[key] = kinds[raw["type"]].model_validate(raw)
        except ValidationError as exc:
            raise pydantic_error(exc, src, where) from None
    total = sum(len(p.choices) for p in out.values() if isinstance(p, CategoricalParam))
    if total > MAX_ALL_CHOICES:
        raise SpecError(f"{src.where('study.space')}: {total} categorical choices in all; at most {MAX_ALL_CHOICES}")
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
    """Parameter sets that try every categorical choice and every conditional parameter at least
    once, each with all ranges at their low ends and at their high ends: each choice with the
    other categoricals at their first choice, and each ``when`` condition made true with its
    first allowed values. Their number grows with the choices, not with their product (twelve
    categoricals of three choices are 2 x 25 sets, not 2 x 3**12)."""
    cats = {k: p.choices for k, p in section.space.items() if isinstance(p, CategoricalParam)}
    first = {k: choices[0] for k, choices in cats.items()}
    picks = [dict(first)]
    picks += [{**first, key: choice} for key, choices in cats.items() for choice in choices[1:]]
    picks += [{**first, **{k: allowed[0] for k, allowed in p.when.items() if k in cats and allowed}}
              for p in section.space.values() if p.when]
    combos: list[dict[str, Any]] = []
    for chosen in picks:
        for end in ("low", "high"):
            def pick(key, param, chosen=chosen, end=end):
                return chosen[key] if key in chosen else getattr(param, end)

            params = resolve_params(section, pick, base)
            if params not in combos:
                combos.append(params)
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
    """Number of points of a grid study (``None`` for other samplers), computed without making them."""
    if section.sampler.type != "grid":
        return None
    return math.prod(p.grid_len() for p in section.space.values())

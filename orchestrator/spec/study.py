"""Study files: the ``study`` section's schema and the validated :class:`Study`.

A study file is a run file plus::

    study:
      name: ptb                     # Optuna study and MLflow experiment (default: file name)
      metric: val_ppl
      direction: minimize
      trials: 20                    # the study's total budget
      timeout: null                 # seconds for this invocation
      sampler: {type: tpe, seed: 0}                 # tpe | random | cmaes | grid | qmc
      pruner: {type: median, n_warmup_steps: 2}     # none | median | successive_halving | hyperband
      resources: {workers: null, devices: null, trials_per_device: 1}
      storage: null                 # default: a journal file under mlruns/optuna/
      heartbeat: {interval: 30, grace_period: 120}  # RDB storages: when a silent trial counts as lost
      outage_grace: 600             # seconds a storage or tracking store that does not answer is waited for
      checkpoint_dir: null          # a folder (default mlruns/checkpoints), mlflow, or s3://bucket/prefix
      checkpoint_every: {seconds: 300}  # also inside an epoch: every N seconds and/or windows (and at SIGTERM)
      space:
        cell.plugin: {type: categorical, choices: [lstm, diy_lstm, rnn]}
        cell.hidden_size: {type: int, low: 100, high: 800, step: 50}
        module.lr: {type: float, low: 0.1, high: 2.0, log: true}
        cell.forget_bias: {type: float, low: 0.0, high: 2.0, when: {cell.plugin: [lstm, diy_lstm]}}

The search space is :mod:`orchestrator.spec.space`; the sampler and pruner
:mod:`orchestrator.spec.samplers`. Nothing here reads or writes a store.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator import names, object_store
from orchestrator.errors import SpecError
from orchestrator.names import shown
from orchestrator.spec.files import Source, apply_overrides, load_yaml, override_keys, pydantic_error
from orchestrator.spec.run import Name, RunSpec, validate
from orchestrator.spec.samplers import make_pruner, make_sampler
from orchestrator.spec.space import MAX_GRID, Param, corners, lookup, parse_space

SAMPLERS = ("tpe", "random", "cmaes", "grid", "qmc")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
#: the largest budget a study may have
MAX_TRIALS = 1_000_000
#: the largest seed of a sampler (NumPy's range, less the offsets of the workers that join)
MAX_SEED = 2**31 - 1


class NamedOptions(BaseModel):
    """``{type: name, **keyword arguments of the Optuna class}``."""

    model_config = ConfigDict(extra="allow")
    type: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: int | None = Field(default=None, ge=1, le=1024)
    devices: list[Annotated[int, Field(ge=0, le=1023)]] | None = Field(default=None, max_length=1024)
    trials_per_device: int = Field(default=1, ge=1, le=64)


class HeartbeatSettings(BaseModel):
    """How often a running trial tells an RDB storage it is alive, and after how long without a
    sign of life it counts as lost (its worker killed, its machine gone) and is retried."""

    model_config = ConfigDict(extra="forbid")
    interval: int = Field(default=30, ge=1, le=24 * 3600)
    grace_period: int = Field(default=120, ge=1, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _check(self):
        if self.grace_period <= self.interval:
            raise ValueError(f"grace_period ({self.grace_period}) must be longer than interval ({self.interval})")
        return self


class CheckpointEvery(BaseModel):
    """How often a trial checkpoints between two training windows (besides every epoch's end and a
    stop signal): every ``windows`` training windows and/or every ``seconds`` of training, whichever
    comes first (``null``: not by that measure)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    windows: int | None = Field(default=None, ge=1, le=10**9)
    seconds: float | None = Field(default=300, gt=0, le=7 * 24 * 3600)


class StudySection(BaseModel):
    """The validated ``study`` section."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: Name | None = None
    metric: Name
    direction: Literal["minimize", "maximize"]
    trials: int | None = Field(default=None, ge=1, le=MAX_TRIALS)
    timeout: float | None = Field(default=None, gt=0, le=366 * 24 * 3600)
    sampler: NamedOptions = NamedOptions(type="tpe")
    pruner: NamedOptions = NamedOptions(type="none")
    resources: Resources = Resources()
    storage: str | None = Field(default=None, max_length=4096)
    heartbeat: HeartbeatSettings = HeartbeatSettings()
    #: seconds a store that does not answer (a database restart, a tracking server away, a network
    #: partition) is waited for before the running trials end interrupted and the study stops
    outage_grace: float = Field(default=600, gt=0, le=7 * 24 * 3600)
    checkpoint: bool = True
    checkpoint_dir: str | None = Field(default=None, max_length=4096)
    checkpoint_every: CheckpointEvery = CheckpointEvery()
    space: dict[str, Param] = Field(default_factory=dict)

    @field_validator("checkpoint_dir")
    @classmethod
    def _a_folder_mlflow_or_url(cls, value: str | None) -> str | None:
        return object_store.check(value) if object_store.is_url(value) else value


class Study:
    """A validated study file: the base run data, the study section, and where they came from."""

    def __init__(self, data: dict[str, Any], section: StudySection, src: Source, base: RunSpec):
        self.data = data
        self.section = section
        self.src = src
        self.base = base
        #: the runs at the study's corners (:func:`~orchestrator.spec.space.corners`), each validated
        #: by :func:`study_from`; empty for a study only parsed
        self.variants: list[RunSpec] = []

    @property
    def name(self) -> str:
        """The study's name: ``study.name``, else the file's ``name``, else the file's name without
        ``.yaml`` (checked when the study is loaded: :func:`orchestrator.names.check`)."""
        return self.section.name or self.base.name or Path(self.src.path).stem

    @property
    def max_epochs(self) -> int | None:
        """The epochs each trial trains (``None``: not a fixed number, or searched)."""
        value = self.base.trainer.get("max_epochs")
        return value if isinstance(value, int) and value > 0 else None

    def spec_for(self, params: dict[str, Any]) -> RunSpec:
        """The run of one trial: the file's settings with ``params`` (dotted keys) applied.

        A searched setting whose ``when`` condition does not hold is absent from the run, even if
        the file also gives it a fixed value (``cell.forget_bias`` for an ``rnn`` cell).
        """
        data = copy.deepcopy(self.data)
        for key in self.section.space:
            node = data
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            if key in params:
                node[last] = params[key]
            else:
                node.pop(last, None)
        # the machine was checked when the file was loaded; a worker's slot sets its own device
        return validate(data, self.src, machine=False)


def _section(data: dict[str, Any], src: Source) -> StudySection:
    raw = data.get("study")
    if not isinstance(raw, dict):
        raise SpecError(f"{src.path}: no study section: add study: with metric, direction and space "
                        "(orch train runs a file without one)")
    raw = dict(raw)
    space = parse_space(raw.pop("space", {}) or {}, src)
    try:
        section = StudySection.model_validate({**raw, "space": {}})
    except ValidationError as exc:
        raise pydantic_error(exc, src, "study") from None
    section.space = space
    if section.sampler.type not in SAMPLERS:
        raise src.error("study.sampler.type", f"unknown sampler {shown(section.sampler.type)}; "
                        f"valid: {', '.join(SAMPLERS)}")
    if section.pruner.type not in PRUNERS:
        raise src.error("study.pruner.type", f"unknown pruner {shown(section.pruner.type)}; "
                        f"valid: {', '.join(PRUNERS)}")
    for what in ("sampler", "pruner"):
        _check_options(getattr(section, what).options, src, f"study.{what}")
    return section


#: options of a sampler or pruner that count (trials, steps, resources): never negative
_COUNTS = ("n_", "trials", "steps", "resource", "factor", "rate", "interval", "population", "size")


def _check_options(options: dict[str, Any], src: Source, where: str) -> None:
    """The sampler's or pruner's own options, by their meaning: a seed in NumPy's range, counts
    that are not negative, numbers that are finite (Optuna accepts ``n_startup_trials: -5``)."""
    for key, value in options.items():
        dotted = f"{where}.{key}"
        if key == "seed":
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= MAX_SEED):
                raise src.error(dotted, f"{dotted} = {shown(value)} is not valid: a seed is an int from 0 to "
                                f"{MAX_SEED}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise src.error(dotted, f"{dotted} = {value}: a setting must be a finite number")
        if value < 0 and any(part in key for part in _COUNTS):
            raise src.error(dotted, f"{dotted} = {value} is not valid: it counts (trials, steps or resources), "
                            "so it must be >= 0")


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Load and fully validate a study file; any problem is one :class:`SpecError`."""
    data, src = load_yaml(path)
    src.overridden = override_keys(overrides)
    searched = [k for k in src.overridden if k in ((data.get("study") or {}).get("space") or {})]
    if searched:
        raise SpecError(f"{path} (--set {searched[0]}): {searched[0]} is searched by study.space, so a fixed value "
                        f"would be ignored; change its range (--set study.space.{searched[0]}.high=...) or take it "
                        "out of the space")
    return study_from(apply_overrides(data, overrides), src)


def parsed_study(data: dict[str, Any], src: Source) -> Study:
    """A study file parsed, without importing or checking its plugins (:func:`study_from` does):
    for commands that only read a study (``show``, ``best``, ``report``, ``ui``), whose file was
    checked when the study was created. Its :meth:`Study.spec_for` still checks each run."""
    try:
        base = RunSpec.model_validate(data)
    except ValidationError as exc:
        raise pydantic_error(exc, src) from None
    return named(Study(data, _section(data, src), src, base))


def named(study: Study) -> Study:
    """``study`` if its name is a valid name (:mod:`orchestrator.names`): ``study.name`` and ``name``
    are checked as fields; this checks the file's name, when that is the study's."""
    if not (study.section.name or study.base.name):
        why = names.problem(study.name)
        if why:
            raise SpecError(f"{study.src.path}: the study name {names.shown(study.name)} is not valid: {why} (it is "
                            "the file's name: set study.name)")
    return study


def study_from(data: dict[str, Any], src: Source) -> Study:
    """Validate a study's loaded data (from a file, or as stored with the study)."""
    section = _section(data, src)
    base = validate(data, src)
    for key, p in section.space.items():
        for cond in (p.when or {}):
            if cond not in section.space and lookup(data, cond) is None:
                raise src.error(f"study.space.{key}", f"condition on {shown(cond)}, which is neither a "
                                "searched nor a fixed setting")
    if section.sampler.type == "grid":
        size = 1
        for key, p in section.space.items():
            try:
                size *= p.grid_len()
            except ValueError as exc:
                raise src.error(f"study.space.{key}", f"{exc}") from None
            if size > MAX_GRID:
                raise src.error(f"study.space.{key}", f"the grid has over {MAX_GRID:,} points with "
                                f"study.space.{key} (it has {p.grid_len():,} values): use a coarser step, or "
                                "another sampler")
    for what, make in (("sampler", lambda: make_sampler(section)),
                       ("pruner", lambda: make_pruner(section, base.trainer.get("max_epochs")))):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                make()
        except Exception as exc:  # noqa: BLE001 - Optuna's own message names the bad option
            raise src.error(f"study.{what}", f"study.{what}: {type(exc).__name__}: {exc}") from None
    study = named(Study(data, section, src, base))
    # every choice and every condition, at both range ends, must make a valid run
    for params in corners(section, data):
        try:
            study.variants.append(study.spec_for(params))
        except SpecError as exc:
            key = exc.key if exc.key in params else next(
                (k for k in params if exc.key and exc.key.startswith(k.split(".")[0] + ".")), None)
            if key is None:
                raise
            raise src.error(f"study.space.{key}", f"{exc.detail} (for the trial settings "
                            f"{shown(params, 300)})") from None
    return study

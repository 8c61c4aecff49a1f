"""Study files: the ``study`` section's schema, its search space, samplers, pruners and storage.

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
      checkpoint_dir: null          # where trials keep their last checkpoint (default mlruns/checkpoints)
      space:
        cell.plugin: {type: categorical, choices: [lstm, diy_lstm, rnn]}
        cell.hidden_size: {type: int, low: 100, high: 800, step: 50}
        module.lr: {type: float, low: 0.1, high: 2.0, log: true}
        cell.forget_bias: {type: float, low: 0.0, high: 2.0, when: {cell.plugin: [lstm, diy_lstm]}}

Parameters are sampled in the order written; ``when`` makes a parameter exist only when earlier
(or fixed) settings take one of the listed values.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.config import RunSpec, Source, SpecError, apply_overrides, override_keys, validate

SAMPLERS = ("tpe", "random", "cmaes", "grid", "qmc")
PRUNERS = ("none", "median", "successive_halving", "hyperband")


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


class NamedOptions(BaseModel):
    """``{type: name, **keyword arguments of the Optuna class}``."""

    model_config = ConfigDict(extra="allow")
    type: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: int | None = Field(default=None, ge=1)
    devices: list[int] | None = None
    trials_per_device: int = Field(default=1, ge=1)


class Heartbeat(BaseModel):
    """How often a running trial tells an RDB storage it is alive, and after how long without a
    sign of life it counts as lost (its worker killed, its machine gone) and is retried."""

    model_config = ConfigDict(extra="forbid")
    interval: int = Field(default=30, ge=1)
    grace_period: int = Field(default=120, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.grace_period <= self.interval:
            raise ValueError(f"grace_period ({self.grace_period}) must be longer than interval ({self.interval})")
        return self


class StudySection(BaseModel):
    """The validated ``study`` section."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    metric: str
    direction: Literal["minimize", "maximize"]
    trials: int | None = Field(default=None, ge=1)
    timeout: float | None = Field(default=None, gt=0)
    sampler: NamedOptions = NamedOptions(type="tpe")
    pruner: NamedOptions = NamedOptions(type="none")
    resources: Resources = Resources()
    storage: str | None = None
    heartbeat: Heartbeat = Heartbeat()
    checkpoint: bool = True
    checkpoint_dir: str | None = None
    space: dict[str, Param] = Field(default_factory=dict)


# ---- loading and validation ---------------------------------------------------------------------
class Study:
    """A validated study file: the base run data, the study section, and where they came from."""

    def __init__(self, data: dict[str, Any], section: StudySection, src: Source, base: RunSpec):
        self.data = data
        self.section = section
        self.src = src
        self.base = base

    @property
    def name(self) -> str:
        return self.section.name or self.base.name or Path(self.src.path).stem

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


def _pydantic_message(exc: ValidationError, prefix: str, src: Source) -> SpecError:
    err = exc.errors()[0]
    dotted = ".".join(str(p) for p in [prefix, *err["loc"]] if p != "")
    if err["type"] == "extra_forbidden":
        return src.error(dotted, f"unknown key {dotted!r}")
    got = f" (got {err['input']!r})" if not isinstance(err.get("input"), dict) else ""
    return src.error(dotted, f"{dotted}: {err['msg'].removeprefix('Value error, ')}{got}")


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
            raise _pydantic_message(exc, where, src) from None
    return out


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
        raise _pydantic_message(exc, "study", src) from None
    section.space = space
    if section.sampler.type not in SAMPLERS:
        raise src.error("study.sampler.type", f"unknown sampler {section.sampler.type!r}; "
                        f"valid: {', '.join(SAMPLERS)}")
    if section.pruner.type not in PRUNERS:
        raise src.error("study.pruner.type", f"unknown pruner {section.pruner.type!r}; "
                        f"valid: {', '.join(PRUNERS)}")
    return section


def _lookup(data: dict[str, Any], dotted: str) -> Any:
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
        if p.when and not all((active[k] if k in active else _lookup(base, k)) in allowed
                              for k, allowed in p.when.items()):
            continue
        active[key] = pick(key, p)
    return active


def _corners(section: StudySection, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Parameter sets covering every combination of categorical choices, each with all ranges
    at their low ends and at their high ends."""
    cats = [k for k, p in section.space.items() if isinstance(p, CategoricalParam)]
    combos = []
    for choice in itertools.product(*(section.space[k].choices for k in cats)):
        chosen = dict(zip(cats, choice))
        for end in ("low", "high"):
            combos.append(resolve_params(section, lambda k, p: chosen[k] if k in chosen else getattr(p, end), base))
    return combos


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Load and fully validate a study file; any problem is one :class:`SpecError`."""
    from orchestrator.config import load_yaml

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
        raise _pydantic_message(exc, "", src) from None
    return Study(data, _section(data, src), src, base)


def study_from(data: dict[str, Any], src: Source) -> Study:
    """Validate a study's loaded data (from a file, or as stored with the study)."""
    section = _section(data, src)
    base = validate(data, src)
    for key, p in section.space.items():
        for cond in (p.when or {}):
            if cond not in section.space and _lookup(data, cond) is None:
                raise src.error(f"study.space.{key}", f"condition on {cond!r}, which is neither a "
                                "searched nor a fixed setting")
    if section.sampler.type == "grid":
        for key, p in section.space.items():
            try:
                p.grid()
            except ValueError as exc:
                raise src.error(f"study.space.{key}", f"{exc}") from None
    for what, make in (("sampler", lambda: make_sampler(section)),
                       ("pruner", lambda: make_pruner(section, base.trainer.get("max_epochs")))):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                make()
        except Exception as exc:  # noqa: BLE001 - Optuna's own message names the bad option
            raise src.error(f"study.{what}", f"study.{what}: {type(exc).__name__}: {exc}") from None
    study = Study(data, section, src, base)
    # every combination of choices and range ends must make a valid run
    for params in _corners(section, data):
        try:
            study.spec_for(params)
        except SpecError as exc:
            key = exc.key if exc.key in params else next(
                (k for k in params if exc.key and exc.key.startswith(k.split(".")[0] + ".")), None)
            if key is None:
                raise
            raise src.error(f"study.space.{key}", f"{exc.detail} (for the trial settings {params})") from None
    return study


# ---- Optuna objects ------------------------------------------------------------------------------
def suggest(trial, section: StudySection, base: dict[str, Any]) -> dict[str, Any]:
    """Sample the active parameters of ``trial`` (define-by-run, honouring ``when``)."""

    def pick(key, p):
        if isinstance(p, CategoricalParam):
            return trial.suggest_categorical(key, p.choices)
        if isinstance(p, IntParam):
            return trial.suggest_int(key, p.low, p.high, step=p.step, log=p.log)
        return trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)

    return resolve_params(section, pick, base)


def make_sampler(section: StudySection, stream: int = 0):
    """The study's sampler for the worker that draws sampler stream ``stream``.

    Every worker that joins a study gets a stream number of its own (0, 1, 2, ... in the order
    they join, handed out under the study's lock), and a seeded sampler draws with ``seed +
    stream``: one worker on a fresh study draws exactly the sequence of the file's seed, and any
    number of workers, started at the same instant on any machine, draw distinct sequences. QMC
    and grid keep the file's seed for all: their points are shared and handed out in turn.
    """
    import optuna

    opts = section.sampler.options
    kind = section.sampler.type
    if kind == "qmc":
        opts.setdefault("seed", 0)  # one sequence for every worker, indexed by trial number
    elif opts.get("seed") is not None and kind != "grid":  # a grid's order must be shared too
        opts["seed"] = int(opts["seed"]) + stream
    if kind == "tpe":
        return optuna.samplers.TPESampler(**opts)
    if kind == "random":
        return optuna.samplers.RandomSampler(**opts)
    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(**opts)
    if kind == "qmc":
        return optuna.samplers.QMCSampler(**opts)
    class Grid(optuna.samplers.GridSampler):
        # Optuna's grid sampler stops the study from inside ``tell`` once the grid is covered,
        # which is only allowed within ``Study.optimize``; orch's workers stop on the budget,
        # which the coordinator caps at the grid size.
        def after_trial(self, study, trial, state, values):
            pass

    return Grid(grid_points(section), **opts)


def grid_points(section: StudySection) -> dict[str, list]:
    return {k: p.grid() for k, p in section.space.items()}


def grid_size(section: StudySection) -> int | None:
    """Number of points of a grid study (``None`` for other samplers)."""
    if section.sampler.type != "grid":
        return None
    return math.prod(len(v) for v in grid_points(section).values())


def make_pruner(section: StudySection, max_epochs: int | None):
    import optuna

    opts = section.pruner.options
    kind = section.pruner.type
    if kind == "median":
        return optuna.pruners.MedianPruner(**opts)
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**opts)
    if kind == "hyperband":
        opts.setdefault("max_resource", max_epochs or "auto")
        return optuna.pruners.HyperbandPruner(**opts)
    return optuna.pruners.NopPruner()


def default_storage_url(name: str) -> str:
    """A journal file under ``mlruns/optuna/``: safe for several processes on one machine."""
    return f"journal:{Path('mlruns').resolve() / 'optuna' / f'{name}.journal'}"


def open_storage(url: str, heartbeat: Heartbeat | None = None, writable: bool = True):
    """An Optuna storage from a URL: ``journal:PATH`` (file journal) or any SQLAlchemy URL (RDB).

    RDB storages record heartbeats of running trials (``heartbeat``, default :class:`Heartbeat`),
    which is how a trial whose worker vanished is found; orch fails and retries such trials
    itself (:mod:`orchestrator.claims`), in Optuna and MLflow alike. A journal file is checked
    first (:mod:`orchestrator.journal`); ``writable=False`` (a command that only reads) leaves
    even a torn last line alone.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    from orchestrator.locks import init_lock, sqlalchemy_url

    if url.startswith("journal:"):
        from orchestrator import journal

        path = Path(url[len("journal:"):]).expanduser().resolve()
        if not writable:
            journal.check(path, mend=False)  # damage is refused; nothing is written
            return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        path.parent.mkdir(parents=True, exist_ok=True)
        journal.check(path)  # a torn last record is cut away; other damage is refused, untouched
        return JournalStorage(journal.backend(path))
    heartbeat = heartbeat or Heartbeat()
    engine = {"pool_pre_ping": True}
    if url.startswith("sqlite:"):
        engine["connect_args"] = {"timeout": 60}  # writers queue for the file instead of failing
    # a fresh database's tables are created by the first process, under a lock: not by all at once
    with init_lock(url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(sqlalchemy_url(url), engine_kwargs=engine,
                                          heartbeat_interval=heartbeat.interval,
                                          grace_period=heartbeat.grace_period)

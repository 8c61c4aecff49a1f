"""A run's settings: the validated :class:`RunSpec`, each plugin section checked against the
plugin's own ``__init__`` (keys, types, declared ranges) and the Lightning ``Trainer`` arguments.

Every key is checked before anything runs: unknown keys, wrong types, values out of a plugin's
declared range and unknown plugins are reported with the file, the line and the valid choices.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from orchestrator import names, registry
from orchestrator.contracts import SECTIONS
from orchestrator.contracts.settings import Seed
from orchestrator.errors import PluginError
from orchestrator.names import shown
from orchestrator.spec.files import Source, apply_overrides, load_yaml, override_keys, pydantic_error

# settings orch passes itself, never taken from a file
RESERVED = {"cells": {"input_size"}, "modules": {"cell", "info"}, "datasets": set()}


def _valid_name(value: str) -> str:
    why = names.problem(value)
    if why:
        raise ValueError(why)
    return value


#: a name that becomes a path or an MLflow name (:mod:`orchestrator.names`), as a field of a file
Name = Annotated[str, Field(max_length=names.MAX_LENGTH), AfterValidator(_valid_name)]


class PluginSection(BaseModel):
    model_config = ConfigDict(extra="allow")
    plugin: str

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunSpec(BaseModel):
    """A validated run: plugins with their settings, Trainer arguments, seed and tracking."""

    model_config = ConfigDict(extra="forbid")
    name: Name | None = None
    seed: Seed = 0
    dataset: PluginSection
    cell: PluginSection
    module: PluginSection
    trainer: dict[str, Any] = Field(default_factory=dict)
    tracking_uri: str | None = None
    study: dict[str, Any] | None = None

    def resolved(self) -> dict[str, Any]:
        """The spec as a plain dict (what is logged as the resolved config)."""
        return self.model_dump(exclude_none=True)

    def flat_params(self) -> dict[str, Any]:
        """Dotted ``section.key`` -> value for every setting (MLflow params; no URLs, so no passwords)."""
        out: dict[str, Any] = {"seed": self.seed}
        for section in ("dataset", "cell", "module", "trainer"):
            values = getattr(self, section)
            values = values.model_dump() if isinstance(values, BaseModel) else values
            out.update({f"{section}.{k}": v for k, v in values.items()})
        return out



# ---- validation -----------------------------------------------------------------------------
def _accepted(cls: type) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """Keyword parameters a plugin class accepts (following ``**kwargs`` up the MRO) and their hints."""
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init)
        try:
            klass_hints = typing.get_type_hints(init, include_extras=True)  # Annotated constraints too
        except Exception:  # noqa: BLE001 - unresolvable hints only lose the type check
            klass_hints = {}
        var_kw = False
        for name, p in list(sig.parameters.items())[1:]:
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
            elif p.kind is not p.VAR_POSITIONAL and name not in params:
                params[name] = p
                if name in klass_hints:
                    hints[name] = klass_hints[name]
        if not var_kw:
            break
    return params, hints


def check_plugin_settings(section: str, kind: str, cls: type, settings: dict[str, Any], src: Source) -> None:
    """Unknown keys, missing required keys and wrong types of one plugin section.

    Values are converted in place to the plugin's annotated types (``"5"`` -> ``5`` for an int).
    """
    params, hints = _accepted(cls)
    reserved = RESERVED[kind]
    valid = sorted(k for k in params if k not in reserved)
    for key, value in settings.items():
        if key not in params or key in reserved:
            raise src.error(f"{section}.{key}", f"unknown setting {section}.{key} for {kind[:-1]} plugin "
                            f"{cls.__name__}; valid settings: {', '.join(valid) or 'none'}")
        if key in hints:
            settings[key] = _checked(f"{section}.{key}", hints[key], value, src)
    missing = [k for k, p in params.items()
               if p.default is p.empty and k not in reserved and k not in settings]
    if missing:
        raise src.error(section, f"section {section} is missing required setting(s) {', '.join(missing)}")


def _checked(dotted: str, hint: Any, value: Any, src: Source) -> Any:
    """``value`` converted to ``hint`` (with its ``Annotated`` constraints), or a :class:`SpecError`
    that names the type or the valid range."""
    try:
        adapter = TypeAdapter(hint, config={"arbitrary_types_allowed": True, "allow_inf_nan": False})
    except Exception:  # noqa: BLE001 - a hint pydantic cannot check (a class of Lightning's): not checked
        return value
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] in _RANGE_ERRORS:  # a constraint the plugin declares: say the valid range
            raise src.error(dotted, f"{dotted} = {shown(value)} is not valid: "
                            f"{err['msg'].replace('Input should be', 'it must be')}") from None
        raise src.error(dotted, f"{dotted} = {shown(value)} is not a valid {_type_name(hint)}") from None


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
                 "too_short", "too_long", "literal_error"}


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        return names + (" (or null)" if type(None) in args else "")
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


#: Trainer arguments orch sets itself, and why a file may not replace them
OWNED_BY_ORCH = {
    "logger": "orch logs every epoch to the run's MLflow run itself (a logger here would replace it)",
    "callbacks": "orch adds its own (checkpoints, pruning, stop signals); a run file holds settings, not objects",
    "enable_checkpointing": "orch keeps each trial's last checkpoint itself (study.checkpoint, study.checkpoint_dir)",
    "default_root_dir": "orch decides where a trial's files go (study.checkpoint_dir)",
}


def check_finite(node: Any, src: Source, dotted: str = "") -> None:
    """Refuse ``.inf`` and ``.nan`` anywhere in a file: no setting means an infinite or undefined number."""
    if isinstance(node, float) and not math.isfinite(node):
        raise src.error(dotted, f"{dotted} = {node}: a setting must be a finite number")
    if isinstance(node, dict):
        for key, value in node.items():
            check_finite(value, src, f"{dotted}.{key}" if dotted else str(key))
    elif isinstance(node, list):
        for value in node:
            check_finite(value, src, dotted)


def check_trainer(trainer: dict[str, Any], src: Source, machine: bool = True) -> None:
    """Lightning ``Trainer`` arguments: known names, the types of its signature, an epoch budget
    that ends, and (``machine``) an accelerator this machine has."""
    from pytorch_lightning import Trainer  # lazy: Lightning is heavy

    valid = [k for k in inspect.signature(Trainer.__init__).parameters if k != "self"]
    for key, why in OWNED_BY_ORCH.items():
        if key in trainer:
            raise src.error(f"trainer.{key}", f"trainer.{key} cannot be set: {why}")
    try:
        hints = typing.get_type_hints(Trainer.__init__)
    except Exception:  # noqa: BLE001 - unresolvable hints only lose the type check
        hints = {}
    for key in trainer:
        if key not in valid:
            raise src.error(f"trainer.{key}", f"unknown Trainer argument trainer.{key}; "
                            f"valid: {', '.join(sorted(valid))}")
        if key in hints:  # checked, not converted: Lightning takes the values as written
            _checked(f"trainer.{key}", hints[key], trainer[key], src)
    epochs = trainer.get("max_epochs")
    ends = trainer.get("max_steps", -1) not in (None, -1) or trainer.get("max_time") is not None
    if epochs is not None and epochs < 1 and not (epochs == -1 and ends):
        raise src.error("trainer.max_epochs", f"trainer.max_epochs = {epochs} is not valid: it must be >= 1 "
                        "(or -1, Lightning's 'no limit', together with max_steps or max_time; alone it would "
                        "train forever)")
    if trainer.get("min_epochs") is not None and trainer["min_epochs"] < 0:
        raise src.error("trainer.min_epochs", f"trainer.min_epochs = {trainer['min_epochs']} is not valid: "
                        "it must be >= 0")
    if machine:
        _check_accelerator(trainer, src)


def _check_accelerator(trainer: dict[str, Any], src: Source) -> None:
    import torch

    accelerator = str(trainer.get("accelerator", "auto")).lower()
    gpus = torch.cuda.device_count() if accelerator in ("gpu", "cuda") else 0
    if accelerator in ("gpu", "cuda") and not gpus:
        raise src.error("trainer.accelerator", f"trainer.accelerator = {shown(accelerator)}, but this machine has no "
                        "GPU that PyTorch can use (torch.cuda.is_available() is False); use cpu or auto")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise src.error("trainer.accelerator", "trainer.accelerator = 'mps', but MPS is not available here")
    devices = trainer.get("devices")
    if gpus and isinstance(devices, int) and devices > gpus:
        raise src.error("trainer.devices", f"trainer.devices = {devices}, but this machine has {gpus} GPU(s)")


def validate(data: dict[str, Any], src: Source, machine: bool = True) -> RunSpec:
    """Turn loaded YAML into a :class:`RunSpec`, checking plugins and every setting (and, with
    ``machine``, that this machine has the accelerator it asks for)."""
    check_finite(data, src)
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as exc:
        raise pydantic_error(exc, src, valid=list(RunSpec.model_fields)) from None
    for section, kind in SECTIONS.items():
        plugin = getattr(spec, section)
        try:
            cls = registry.get(kind, plugin.plugin)
        except PluginError as exc:
            raise src.error(f"{section}.plugin", str(exc)) from None
        check_plugin_settings(section, kind, cls, plugin.__pydantic_extra__, src)
    check_trainer(spec.trainer, src, machine)
    return spec


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunSpec, Source]:
    """Load, override and validate a run or study file."""
    data, src = load_yaml(path)
    data = apply_overrides(data, overrides)
    src.overridden = override_keys(overrides)
    return validate(data, src), src

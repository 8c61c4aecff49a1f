"""Run and study files: YAML in, a validated :class:`RunSpec` out, or one clear :class:`SpecError`.

A file has the sections ``dataset``, ``cell`` and ``module`` (each ``plugin:`` plus that plugin's
settings), ``trainer`` (Lightning ``Trainer`` arguments), and optionally ``seed``, ``name``,
``tracking_uri`` and ``study`` (the search, read by :mod:`orchestrator.study`). Every key is
checked before anything runs: unknown keys, wrong types and unknown plugins are reported with the
file, the line and the valid choices.
"""

from __future__ import annotations

import copy
import inspect
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PLUGIN_SECTIONS = {"dataset": "datasets", "cell": "cells", "module": "modules"}
# settings orch passes itself, never taken from a file
RESERVED = {"cells": {"input_size"}, "modules": {"cell", "info"}, "datasets": set()}


class SpecError(ValueError):
    """A run or study file is invalid; the message says where and what to do.

    ``key`` is the dotted setting at fault (when there is one) and ``detail`` the message without
    its ``file:line`` prefix.
    """

    def __init__(self, message: str, key: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.key = key
        self.detail = detail or message


class PluginSection(BaseModel):
    model_config = ConfigDict(extra="allow")
    plugin: str

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunSpec(BaseModel):
    """A validated run: plugins with their settings, Trainer arguments, seed and tracking."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    seed: int = 0
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


# ---- YAML with line numbers ----------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """Safe YAML, with YAML 1.2 floats: ``1e-3`` is a number, not the string PyYAML makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass

@dataclass
class Source:
    """Where a spec came from, to point errors at lines."""

    path: str
    lines: dict[str, int]
    #: dotted keys given with --set (their values come from the command line, not the file)
    overridden: tuple[str, ...] = ()

    def error(self, dotted: str, detail: str) -> SpecError:
        """A :class:`SpecError` about ``dotted``, prefixed with the file and line (or ``--set``)."""
        return SpecError(f"{self.where(dotted)}: {detail}", key=dotted, detail=detail)

    def where(self, dotted: str) -> str:
        for key in self.overridden:  # the key itself, a part of it, or a section that holds it
            if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
                return f"{self.path} (--set {key})"
        parts = dotted.split(".")
        while parts and ".".join(parts) not in self.lines:
            parts.pop()
        line = self.lines.get(".".join(parts)) if parts else None
        return f"{self.path}:{line}" if line else self.path


def _line_map(node, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            dotted = f"{prefix}{key.value}"
            out[dotted] = key.start_mark.line + 1
            _line_map(value, dotted + ".", out)
    return out


def load_yaml(path: str | Path) -> tuple[dict[str, Any], Source]:
    """Safely load a YAML mapping from a file, with the line of every dotted key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not a text file (byte {exc.start} is not UTF-8): a run or study file is "
                        "YAML text") from None
    if "\x00" in text:
        raise SpecError(f"{path}: not a text file (it holds NUL bytes): a run or study file is YAML text")
    return yaml_source(text, str(path))


def yaml_source(text: str, label: str) -> tuple[dict[str, Any], Source]:
    """Safely load a YAML mapping from ``text`` (``label`` names it in errors), with line numbers."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{label}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{label}: expected a mapping with sections dataset, cell, module, trainer")
    return data, Source(label, _line_map(node) if node is not None else {})


def override_keys(overrides: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The dotted keys of ``--set KEY=VALUE`` overrides."""
    return tuple(item.partition("=")[0].strip() for item in overrides)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a copy of ``data``."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, for example cell.hidden_size=200")
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        while len(parts) > 1:
            # the longest existing key first, so dotted keys such as a search space's
            # "cell.hidden_size" can be addressed: study.space.cell.hidden_size.high=400
            n = next((n for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in node), 1)
            part, parts = ".".join(parts[:n]), parts[n:]
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[0]] = value
    return data


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
        adapter = TypeAdapter(hint, config={"arbitrary_types_allowed": True})
    except Exception:  # noqa: BLE001 - a hint pydantic cannot check (a class of Lightning's): not checked
        return value
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] in _RANGE_ERRORS:  # a constraint the plugin declares: say the valid range
            raise src.error(dotted, f"{dotted} = {value!r} is not valid: "
                            f"{err['msg'].replace('Input should be', 'it must be')}") from None
        raise src.error(dotted, f"{dotted} = {value!r} is not a valid {_type_name(hint)}") from None


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


def check_trainer(trainer: dict[str, Any], src: Source, machine: bool = True) -> None:
    """Lightning ``Trainer`` arguments: known names, the types of its signature, an epoch budget
    that ends, and (``machine``) an accelerator this machine has."""
    from pytorch_lightning import Trainer  # lazy: Lightning is heavy

    valid = [k for k in inspect.signature(Trainer.__init__).parameters if k != "self"]
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
        raise src.error("trainer.accelerator", f"trainer.accelerator = {accelerator!r}, but this machine has no "
                        "GPU that PyTorch can use (torch.cuda.is_available() is False); use cpu or auto")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise src.error("trainer.accelerator", "trainer.accelerator = 'mps', but MPS is not available here")
    devices = trainer.get("devices")
    if gpus and isinstance(devices, int) and devices > gpus:
        raise src.error("trainer.devices", f"trainer.devices = {devices}, but this machine has {gpus} GPU(s)")


def validate(data: dict[str, Any], src: Source, machine: bool = True) -> RunSpec:
    """Turn loaded YAML into a :class:`RunSpec`, checking plugins and every setting (and, with
    ``machine``, that this machine has the accelerator it asks for)."""
    from orchestrator import registry

    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        dotted = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            msg = (f"unknown key {dotted!r}; valid top-level keys: "
                   f"{', '.join(RunSpec.model_fields)}")
        elif err["type"] == "missing":
            msg = f"missing required key {dotted!r}"
        else:
            msg = f"{dotted}: {err['msg']} (got {err.get('input')!r})"
        raise src.error(dotted, msg) from None
    for section, kind in PLUGIN_SECTIONS.items():
        plugin = getattr(spec, section)
        try:
            cls = registry.get(kind, plugin.plugin)
        except registry.PluginError as exc:
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

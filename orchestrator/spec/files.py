"""Run and study files as data: safe YAML with the line of every key, ``--set`` overrides, and
the one translation of a validation error into a message that names the file, the line and the key.

A file has the sections ``dataset``, ``cell`` and ``module`` (each ``plugin:`` plus that plugin's
settings), ``trainer`` (Lightning ``Trainer`` arguments), and optionally ``seed``, ``name``,
``tracking_uri`` and ``study`` (the search: :mod:`orchestrator.spec.study`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.errors import SpecError


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



def pydantic_error(exc: ValidationError, src: Source, prefix: str = "", valid: list[str] | None = None) -> SpecError:
    """The first error of a pydantic validation as a :class:`SpecError` about its dotted key
    (``prefix``: the section validated; ``valid``: the keys allowed there, named for an unknown one)."""
    err = exc.errors()[0]
    dotted = ".".join(str(p) for p in [prefix, *err["loc"]] if p != "")
    if err["type"] == "extra_forbidden":
        return src.error(dotted, f"unknown key {dotted!r}" + (f"; valid top-level keys: {', '.join(valid)}"
                                                            if valid else ""))
    if err["type"] == "missing":
        return src.error(dotted, f"missing required key {dotted!r}")
    got = f" (got {err['input']!r})" if not isinstance(err.get("input"), dict) else ""
    return src.error(dotted, f"{dotted}: {err['msg'].removeprefix('Value error, ')}{got}")

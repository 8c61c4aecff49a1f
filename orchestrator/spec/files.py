"""Run and study files as data: safe YAML with the line of every key, ``--set`` overrides, and
the one translation of a validation error into a message that names the file, the line and the key.

A file has the sections ``dataset``, ``cell`` and ``module`` (each ``plugin:`` plus that plugin's
settings), ``trainer`` (Lightning ``Trainer`` arguments), and optionally ``seed``, ``name``,
``tracking_uri`` and ``study`` (the search: :mod:`orchestrator.spec.study`).
"""

from __future__ import annotations

import copy
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from orchestrator.errors import SpecError
from orchestrator.names import shown

#: the largest run or study file read (the shipped ones are about 2 KB; the pure-Python YAML parser reads
#: about 100 KB a second, so this bounds a refusal to well under a second)
MAX_BYTES = 32 << 10
#: collections inside collections, at most (the shipped files nest 4 deep)
MAX_DEPTH = 32
#: aliases (``*name``) in one document, and values it holds once every alias is expanded
MAX_ALIASES = 100
MAX_VALUES = 100_000
#: characters of a key (a setting's name, a dotted key of study.space)
MAX_KEY_CHARS = 200
#: characters of a line
MAX_LINE = 20_000


class LimitError(yaml.MarkedYAMLError):
    """A YAML document over one of the limits above: refused while it is read, before it grows."""


# libyaml's parser where PyYAML was built with it (4 times as fast), composed here in Python
_Parser = getattr(yaml, "CParser", None) if getattr(yaml, "__with_libyaml__", False) else None


class _Loader(Composer, SafeConstructor, Resolver, *((_Parser,) if _Parser else (Reader, Scanner, Parser))):
    """Safe YAML, with YAML 1.2 floats (``1e-3`` is a number, not the string PyYAML makes of it),
    bounded: a collection nested over :data:`MAX_DEPTH` deep, over :data:`MAX_ALIASES` aliases or
    an alias inside the collection it names is refused while the document is composed, before
    anything is built from it."""

    def __init__(self, stream):
        if _Parser:
            _Parser.__init__(self, stream)
        else:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0
        self._aliases = 0
        self._open: set[str] = set()

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise LimitError(None, None, f"more than {MAX_ALIASES} aliases (*name): a study file needs few, "
                                 "and an alias bomb many", event.start_mark)
            if event.anchor in self._open:
                raise LimitError(None, None, f"the alias *{shown(event.anchor, 40)[1:-1]} stands inside the "
                                 "collection it names (a value that holds itself)", event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise LimitError(None, None, f"collections nested more than {MAX_DEPTH} deep", event.start_mark)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(anchor)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _compose(text: str):
    """The document's node graph, checked (limits, duplicate keys, keys that are text), and the data
    built from it."""
    loader = _Loader(text)
    try:
        node = Composer.get_single_node(loader)  # composed here (bounded), not by libyaml
        if node is not None:
            _check_graph(node)
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def _check_graph(root) -> None:
    """Count the values of the expanded document (each shared node once per use, without expanding
    it) and refuse a mapping that gives a key twice or a key that is not text."""
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = ([v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if not done:
            if isinstance(node, yaml.MappingNode):
                _check_keys(node)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        sizes[id(node)] = 1 + sum(sizes.get(id(child), 1) for child in children)
        if sizes[id(node)] > MAX_VALUES:
            raise LimitError(None, None, f"more than {MAX_VALUES:,} values once its aliases are expanded",
                             node.start_mark)


def _check_keys(node) -> None:
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode):
            raise LimitError(None, None, "a key that is not text (a list or a mapping used as a key)",
                             key.start_mark)
        if key.tag == "tag:yaml.org,2002:merge":
            continue
        if len(key.value) > MAX_KEY_CHARS:
            raise LimitError(None, None, f"a key of {len(key.value):,} characters; keys name settings, at most "
                             f"{MAX_KEY_CHARS}", key.start_mark)
        line = key.start_mark.line + 1
        if key.value in seen:
            raise LimitError(None, None, f"the key {shown(key.value, 40)} is given twice (lines {seen[key.value]} "
                             f"and {line}): remove one", key.start_mark)
        seen[key.value] = line


def _check_brackets(text: str, label: str) -> None:
    """Refuse flow collections (``[`` and ``{``) opened more than :data:`MAX_DEPTH` deep before the
    YAML scanner meets them (it slows down with the square of their depth). Brackets inside quoted
    text count too: no study file opens more than a few."""
    depth = 0
    for i, char in enumerate(text):
        if char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                line = text.count("\n", 0, i) + 1
                raise SpecError(f"{label}:{line}: refused: collections nested more than {MAX_DEPTH} deep")
        elif char in "]}" and depth:
            depth -= 1


def parse_yaml(text: str) -> Any:
    """Bounded safe YAML (a ``--set`` value, a stored file): the data, or a ``yaml.YAMLError``."""
    return _compose(text)[1]


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line, to follow ``FILE:``: ``LINE:COLUMN: what was found (while what)``,
    with no caret block and no quote of the text (which may hold a password)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"{mark.line + 1}:{mark.column + 1}:" if mark is not None else ""
        what = " ".join((exc.problem or "").split())
        if isinstance(exc, LimitError):
            return f"{where} refused: {what}"
        if exc.context:
            what = f"{what} ({' '.join(exc.context.split())})"
        return f"{where} not valid YAML: {what}"
    if isinstance(exc, yaml.reader.ReaderError):
        return (f" not valid YAML: character {exc.position + 1} is a control character ({exc.character:#x}), "
                "which YAML does not allow")
    return f" not valid YAML: {' '.join(str(exc).split())[:200]}"


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
    """Safely load a YAML mapping from a file (at most :data:`MAX_BYTES`), with the line of every
    dotted key. A UTF-8 byte-order mark and CRLF line ends are taken as any editor writes them."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SpecError(f"{path}: not a regular file: a run or study file is a YAML text file")
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if len(raw) > MAX_BYTES:
        raise SpecError(f"{path}: over {MAX_BYTES // 1024} KiB: a run or study file is a few KB of settings "
                        "(is this the right file?)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not a text file (byte {exc.start} is not UTF-8): a run or study file is "
                        "YAML text") from None
    if "\x00" in text:
        raise SpecError(f"{path}: not a text file (it holds NUL bytes): a run or study file is YAML text")
    return yaml_source(text, str(path))


def yaml_source(text: str, label: str) -> tuple[dict[str, Any], Source]:
    """Safely load a YAML mapping from ``text`` (``label`` names it in errors), with line numbers."""
    if len(text) > MAX_BYTES:
        raise SpecError(f"{label}: over {MAX_BYTES // 1024} KiB of text: refused")
    _check_brackets(text, label)
    for line, row in enumerate(text.splitlines(), 1):
        if len(row) > MAX_LINE:
            raise SpecError(f"{label}:{line}: refused: a line of {len(row):,} characters; at most {MAX_LINE:,}")
    try:
        node, data = _compose(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{label}:{yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{label}: expected a mapping with sections dataset, cell, module, trainer")
    return data, Source(label, _line_map(node) if node is not None else {})


#: ``--set`` options at most, the parts of a dotted key and the characters of one option
MAX_OVERRIDES = 200
MAX_KEY_PARTS = 16
MAX_OVERRIDE_CHARS = 10_000


def override_keys(overrides: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The dotted keys of ``--set KEY=VALUE`` overrides, each checked against the limits above."""
    if len(overrides) > MAX_OVERRIDES:
        raise SpecError(f"{len(overrides)} --set options: at most {MAX_OVERRIDES}")
    keys = []
    for item in overrides:
        key = item.partition("=")[0].strip()
        if len(item) > MAX_OVERRIDE_CHARS:
            raise SpecError(f"--set {shown(item)}: over {MAX_OVERRIDE_CHARS:,} characters")
        if key.count(".") >= MAX_KEY_PARTS:
            raise SpecError(f"--set {shown(key)}: a key of {key.count('.') + 1} dotted parts; settings nest "
                            f"at most {MAX_KEY_PARTS} deep")
        keys.append(key)
    return tuple(keys)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a copy of ``data``."""
    override_keys(overrides)
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {shown(item)}: expected KEY=VALUE, for example cell.hidden_size=200")
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except LimitError as exc:
            raise SpecError(f"--set {shown(key.strip())}:{yaml_problem(exc)}") from None
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
                raise SpecError(f"--set {shown(item)}: {shown(part)} is not a section")
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
    got = f" (got {shown(err['input'])})" if not isinstance(err.get("input"), dict) else ""
    return src.error(dotted, f"{dotted}: {err['msg'].removeprefix('Value error, ')}{got}")

"""The layout's rules, checked on the source (``README.md``, "How orch is built"):

- no import cycle among orch's modules, function-level imports included;
- no module over 400 lines;
- a function-level import only of a heavy library (torch, Lightning, MLflow, Optuna, ...) or of
  an orch module that loads one when imported: everything else is imported where a reader looks;
- the names orch writes into Optuna and MLflow spelled only in ``orchestrator/schema.py``;
- Optuna's private API used only in ``orchestrator/storage/optuna_api.py``;
- the core never imports the first-party plugins (they come through entry points like anyone's).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "orchestrator"
#: libraries that take a noticeable time to import (or start threads): imported where they are used
HEAVY = {"torch", "pytorch_lightning", "lightning", "lightning_fabric", "mlflow", "optuna", "matplotlib", "plotly",
         "sqlalchemy", "numpy", "scipy", "sklearn", "filelock", "psycopg", "fsspec"}
MAX_LINES = 400
#: ``orch doctor`` imports what each check reads inside the check: a broken install is a finding there
DIAGNOSED = {("orchestrator.doctor", "packaging.requirements"),
             ("orchestrator.doctor", "orchestrator.registry.listing")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """``(imported module, at function level, line)`` for every import in a module."""
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                continue  # never run: names for annotations only
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the module's package
                    package = name.split(".")[: len(name.split(".")) - child.level + (path.name == "__init__.py")]
                    base = ".".join([*package, *([base] if base else [])])
                for a in child.names:
                    full = f"{base}.{a.name}"
                    found.append((full if full in MODULES else base, in_function, child.lineno))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return found


def _graph(function_level: bool = True) -> dict[str, set[str]]:
    """Each orch module -> the orch modules it imports (with the packages those load first)."""
    graph = {}
    for name, path in MODULES.items():
        targets = set()
        for target, in_function, _ in _imports(name, path):
            if target in MODULES and (function_level or not in_function):
                parts = target.split(".")  # the packages above it load first, but those above this one are loaded
                targets.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts) + 1))
                               if not name.startswith(p + ".") or p == target)
        graph[name] = targets - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return out


def test_no_import_cycle_among_orchs_modules():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _loads_heavy() -> set[str]:
    """The orch modules that import a heavy library when they are imported (themselves or through
    the orch modules they import at module level)."""
    direct = {name for name, path in MODULES.items()
              if any(t.split(".")[0] in HEAVY for t, in_function, _ in _imports(name, path) if not in_function)}
    graph = _graph(function_level=False)
    heavy, grew = set(direct), True
    while grew:
        more = {name for name, targets in graph.items() if targets & heavy} - heavy
        heavy |= more
        grew = bool(more)
    return heavy


def test_function_level_imports_are_only_of_heavy_libraries():
    heavy = _loads_heavy()
    assert "orchestrator.training.fit" in heavy
    # light: orch --help, plugins list and study show start at once, and a worker process pins its
    # GPU (CUDA_VISIBLE_DEVICES) before anything imports torch
    assert heavy & {"orchestrator.cli", "orchestrator.cli.plugins", "orchestrator.cli.reading",
                    "orchestrator.cli.study", "orchestrator.execution.workers", "orchestrator.execution.coordinator"} \
        == set()
    light = []
    for name, path in MODULES.items():
        for target, in_function, line in _imports(name, path):
            if in_function and target.split(".")[0] not in HEAVY and target not in heavy \
                    and (name, target) not in DIAGNOSED:
                light.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert light == []


#: entry-point groups and a file name: orch's, but not names it writes into a store
_NOT_STORED = {"orch.cells", "orch.datasets", "orch.modules", "mlflow.db"}
_STORED_NAME = re.compile(r"^(orch\.[a-z_]+(\.[a-z_]+)*|mlflow\.[a-zA-Z.]+|best\.[a-z_.]*)$")


def test_the_names_orch_writes_are_spelled_only_in_the_schema():
    spelled = []
    for name, path in MODULES.items():
        if name in ("orchestrator.schema", "orchestrator.contracts"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value not in _NOT_STORED \
                    and _STORED_NAME.match(node.value) and not node.value.startswith("mlflow.store"):
                spelled.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value!r}")
    assert spelled == []


_PRIVATE = {"_storage", "_study_id", "_trial_id", "_get_stale_trial_ids", "_backend", "_file_path"}


def test_optunas_private_api_is_used_only_in_its_adapter():
    used = []
    for name, path in MODULES.items():
        if name == "orchestrator.storage.optuna_api":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in _PRIVATE:
                used.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} .{node.attr}")
        for target, _, line in _imports(name, path):
            if target.startswith("optuna") and any(p.startswith("_") for p in target.split(".")):
                used.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert used == []


def test_the_core_never_imports_the_first_party_plugins():
    imported = [f"{path.relative_to(PACKAGE.parent)}:{line}" for name, path in MODULES.items()
                for target, _, line in _imports(name, path) if target.split(".")[0] in ("orch_plugins", "plugins")]
    assert imported == []


def test_the_command_tables_say_what_each_command_says():
    """``orch --help`` and ``orch study --help`` list commands from tables, without loading them:
    the tables must not drift from the commands' own help."""
    from orchestrator.cli import main
    from orchestrator.cli.study import study

    for group in (main, study):
        for name, (_, text) in group.table.items():
            command = group.get_command(None, name)
            assert command.name == name and " ".join(command.help.split("\n\n")[0].split()) == text, name


def test_every_package_of_orch_is_installed():
    """A regular (not editable) install ships the packages ``pyproject.toml`` lists: all of them."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11 reads TOML")
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert packages - listed == set()
    folders = {path.parent for path in MODULES.values()}  # none a namespace package, which a wheel would drop
    assert [f for f in folders if not (f / "__init__.py").is_file()] == []

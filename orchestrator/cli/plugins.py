"""``orch plugins list|check|new``: the installed cell, dataset and module plugins."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from orchestrator import registry
from orchestrator.errors import UsageError
from orchestrator.registry import checks
from orchestrator.registry.listing import listing
from orchestrator.registry.scaffold import new_plugin


@click.group()
def plugins() -> None:
    """Installed cell, dataset and module plugins."""


@plugins.command("check")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins_check(names: tuple[str, ...], as_json: bool) -> None:
    """Run the contract checks of NAMES (default: every installed plugin) on tiny inputs.

    Exit 1 if any plugin fails a check or does not load; a dataset whose data is not on this
    machine is reported as such.
    """
    found = registry.discover_all()
    if names:
        unknown = [n for n in names if n not in {p.name for p in found}]
        if unknown:
            raise UsageError(f"no plugin named {', '.join(map(repr, unknown))}; installed: "
                 f"{', '.join(sorted({p.name for p in found}))}")
        found = [p for p in found if p.name in names]
    verdicts = [checks.check(info) for info in found]
    if as_json:
        click.echo(json.dumps([v.as_dict() for v in verdicts], indent=2))
    else:
        table = Table("kind", "name", "distribution", "version", "check")
        colour = {"ok": "green", "failed": "red", "broken": "red", "no data": "yellow"}
        for v in verdicts:
            text = f"[{colour[v.status]}]{v.status}[/{colour[v.status]}]"
            if v.rule:
                text += f" [{v.rule}] {v.detail}\nfix: {v.fix}"
            elif v.detail:  # no data: the dataset's own message, shortened (--json has it whole)
                text += f": {v.detail if len(v.detail) < 120 else v.detail[:117] + '...'}"
            table.add_row(v.kind[:-1], v.name, v.distribution, v.version, text)
        Console().print(table)
    if any(v.status in ("failed", "broken") for v in verdicts):
        sys.exit(1)


@plugins.command("new")
@click.argument("kind", type=click.Choice(["cell", "dataset", "module"]))
@click.argument("name")
@click.option("--dir", "folder", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where to write the package folder orch-NAME.")
def plugins_new(kind: str, name: str, folder: str) -> None:
    """Write an installable plugin package orch-NAME: entry point, a working KIND, tests that run
    orch's contract kit, a study file and a README."""
    try:
        root = new_plugin(kind, name, folder)
    except (ValueError, FileExistsError) as exc:
        raise UsageError(str(exc)) from None
    click.echo(f"wrote {root}: pip install -e {root}[test] && pytest {root}/tests && "
               f"orch plugins check {name} && orch study run {root}/studies/{name}.yaml", err=True)
    click.echo(str(root))


@plugins.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--refresh", is_flag=True, help="Load every plugin again rather than trust the cached listing "
              "(it is recomputed anyway whenever a plugin, an installed package or orch changes).")
def plugins_list(as_json: bool, refresh: bool) -> None:
    """List every plugin with its distribution, version and status (broken ones with the error)."""
    found = listing(refresh)
    if as_json:
        click.echo(json.dumps([p.as_dict() for p in found], indent=2))
        return
    table = Table("kind", "name", "distribution", "version", "status")
    for p in found:
        status = "ok" if p.status == "ok" else f"[red]broken[/red]: {p.error}"
        table.add_row(p.kind, p.name, p.distribution, p.version, status)
    Console().print(table)

"""``orch doctor``: the environment on one screen (:mod:`orchestrator.doctor`)."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.doctor import as_dicts, collect


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--storage", default=None, help="Optuna storage to check (default: $ORCH_STORAGE, else the journal "
              "under mlruns/optuna/).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI to check (default: $MLFLOW_TRACKING_URI, "
              "else SQLite in ./mlruns).")
def doctor(as_json: bool, storage: str | None, tracking_uri: str | None) -> None:
    """Versions, GPUs, data, storage, tracking and plugins on one screen; exit 1 if the main job cannot run."""
    found = collect(storage, tracking_uri)
    failed = [f for f in found if f.status == "fail"]
    if as_json:
        click.echo(json.dumps({"ok": not failed, "findings": as_dicts(found)}, indent=2))
    else:
        table = Table("", "", "found", "")
        colour = {"ok": "green", "warn": "yellow", "fail": "red"}
        for f in found:
            table.add_row(f.section, f.name, escape(f.value), f"[{colour[f.status]}]{f.status}[/]")
        console = Console()
        console.print(table)
        for f in found:
            if f.fix:
                console.print(f"[{colour[f.status]}]{f.status}[/] {f.section} {f.name}: {escape(f.fix)}")
        console.print("ready for the main job" if not failed else
                      f"[red]{len(failed)} problem(s) stop the main job[/]: fix the lines above")
    sys.exit(1 if failed else 0)

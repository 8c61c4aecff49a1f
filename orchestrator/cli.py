"""The ``orch`` command line. Only click is imported at start-up; each command imports what it needs."""

from __future__ import annotations

import json
import sys

import click

from orchestrator import __version__

EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="orch")
def main() -> None:
    """orch: plugin-based experiments for recurrent sequence models.

    Plugins (cells, datasets, modules) come from entry points; `orch train FILE` runs one
    configuration, `orch study run FILE` an Optuna study, `orch ui` opens the MLflow UI.
    """


# ---- plugins ------------------------------------------------------------------------------
@main.group()
def plugins() -> None:
    """Installed cell, dataset and module plugins."""


@plugins.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins_list(as_json: bool) -> None:
    """List every plugin with its distribution, version and status (broken ones with the error)."""
    from orchestrator import registry

    found = registry.discover_all()
    if as_json:
        click.echo(json.dumps([p.as_dict() for p in found], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("kind", "name", "distribution", "version", "status")
    for p in found:
        status = "ok" if p.status == "ok" else f"[red]broken[/red]: {p.error}"
        table.add_row(p.kind, p.name, p.distribution, p.version, status)
    Console().print(table)


# ---- train --------------------------------------------------------------------------------
SET_HELP = "Override a setting, e.g. --set cell.hidden_size=200 (repeatable)."


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: SQLite in ./mlruns).")
@click.option("--experiment", default=None, help="MLflow experiment (default: the file's name).")
@click.option("--test/--no-test", default=False, help="Also evaluate on the test split at the end.")
def train(file: str, overrides: tuple[str, ...], tracking_uri: str | None, experiment: str | None,
          test: bool) -> None:
    """Train FILE's fixed settings once (a study section is ignored) and log it to MLflow."""
    from pathlib import Path

    from orchestrator.config import SpecError, load_spec

    try:
        spec, _ = load_spec(file, overrides)
    except SpecError as exc:
        fail(str(exc))
    from orchestrator import runner
    from orchestrator.contracts.module import NonFiniteLossError
    from orchestrator.tracking import redact, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri or spec.tracking_uri)
    name = experiment or spec.name or Path(file).stem
    click.echo(f"training {spec.cell.plugin} / {spec.module.plugin} on {spec.dataset.plugin}; "
               f"MLflow: {redact(uri)} experiment {name!r}", err=True)
    try:
        result = runner.tracked_run(spec, tracking_uri=uri, experiment=name, test=test,
                                    tags={"orch.command": "train"})
    except (runner.IncompatibleError, NonFiniteLossError, ValueError, OSError) as exc:
        fail(f"{type(exc).__name__}: {exc}", code=1)
    click.echo(json.dumps({"run_id": result.run_id, **result.metrics}, indent=2))


# ---- study (filled by orchestrator.study) -------------------------------------------------
@main.group()
def study() -> None:
    """Optuna studies over run files."""


# ---- ui -----------------------------------------------------------------------------------
@main.command()
@click.option("--tracking-uri", default=None, help="Store to browse (default: SQLite in ./mlruns).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=5000, show_default=True, type=int)
def ui(tracking_uri: str | None, host: str, port: int) -> None:
    """Open the MLflow UI on the project's store (bound to 127.0.0.1 unless told otherwise)."""
    import os
    from pathlib import Path

    from orchestrator.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///"):]).parent / "artifacts"
        cmd += ["--default-artifact-root", artifacts.resolve().as_uri()]
    click.echo(f"MLflow UI on http://{host}:{port}", err=True)
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()

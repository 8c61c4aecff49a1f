"""The ``orch`` command line. Only click is imported at start-up; each command imports what it needs."""

from __future__ import annotations

import json
import os
import sys

import click

from orchestrator import __version__

EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def preflight(spec, file: str) -> None:
    """Missing data or a module that does not fit its dataset: exit 2 before anything is written."""
    from orchestrator import runner

    try:
        runner.preflight(spec)
    except Exception as exc:  # noqa: BLE001 - a dataset plugin's own error says what is wrong
        fail(f"{file}: {type(exc).__name__}: {exc}")


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
    preflight(spec, file)
    from orchestrator import runner, tracking
    from orchestrator.contracts.module import NonFiniteLossError

    uri = tracking.resolve_tracking_uri(tracking_uri or spec.tracking_uri)
    name = experiment or spec.name or Path(file).stem
    click.echo(f"training {spec.cell.plugin} / {spec.module.plugin} on {spec.dataset.plugin}; "
               f"MLflow: {tracking.redact(uri)} experiment {name!r}", err=True)
    mlf = tracking.client(uri)
    run_id = runner.start_run(mlf, name, tags={"orch.command": "train"})
    try:
        result = runner.tracked_fit(spec, mlf, run_id, test=test)
    except BaseException as exc:
        killed = isinstance(exc, (KeyboardInterrupt, SystemExit))
        runner.end_run(mlf, run_id, "killed" if killed else "failed", exc)
        if killed:
            raise
        if isinstance(exc, (runner.IncompatibleError, NonFiniteLossError, ValueError, OSError)):
            fail(f"{type(exc).__name__}: {exc} (MLflow run {run_id})", code=1)
        raise
    runner.end_run(mlf, run_id, "complete")
    click.echo(json.dumps({"run_id": run_id, **result.metrics}, indent=2))


# ---- study -------------------------------------------------------------------------------
@main.group()
def study() -> None:
    """Optuna studies over run files: run, show, best."""


def _devices(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        fail(f"--devices {value!r}: expected GPU ids such as 0,2")


@study.command("run")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Total budget of the study (re-running continues up to it).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop claiming new trials after this many seconds.")
@click.option("--workers", "workers_n", type=click.IntRange(min=1), default=None,
              help="CPU worker processes (torch threads are split between them).")
@click.option("--devices", default=None, help="GPU ids to use, e.g. 0,2 (default: all visible GPUs).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--storage", default=None, help="Optuna storage URL (default: journal file under mlruns/optuna/).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: SQLite in ./mlruns).")
def study_run(file, trials, timeout, workers_n, devices, overrides, storage, tracking_uri) -> None:
    """Run (or resume) the study in FILE until its trial budget is met."""
    from orchestrator.config import SpecError
    from orchestrator.study import load_study

    try:
        spec = load_study(file, overrides)
    except SpecError as exc:
        fail(str(exc))
    preflight(spec.base, file)
    from orchestrator.coordinator import run_study

    try:
        outcome = run_study(spec, trials=trials, timeout=timeout, workers_n=workers_n, devices=_devices(devices),
                            storage_url=storage, tracking_uri=tracking_uri, echo=lambda m: click.echo(m, err=True),
                            live=sys.stderr.isatty())
    except SpecError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    click.echo(json.dumps({"study": outcome.name, **outcome.counts, "best_value": outcome.best_value,
                           "best_params": outcome.best_params, "parent_run_id": outcome.parent_run_id}, indent=2))


def _open(target: str, storage: str | None):
    """The Optuna study named by a study file or by its name."""
    import optuna

    from orchestrator.config import SpecError
    from orchestrator.study import default_storage_url, load_study, open_storage
    from orchestrator.tracking import redact

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = target
    if target.endswith((".yaml", ".yml")):
        try:
            spec = load_study(target)
        except SpecError as exc:
            fail(str(exc))
        name, storage = spec.name, storage or spec.section.storage
    url = storage or default_storage_url(name)
    if url.startswith("journal:") and not os.path.exists(url[len("journal:"):]):
        fail(f"no study {name!r}: {url[len('journal:'):]} does not exist (run `orch study run` first, "
             "or pass --storage)")
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        fail(f"no study {name!r} in {redact(url)}")
    except Exception as exc:  # noqa: BLE001 - unreachable server, bad URL, ...
        fail(f"cannot open the Optuna storage {redact(url)}: {type(exc).__name__}: {redact(str(exc))}")


@study.command("show")
@click.argument("target", metavar="FILE|NAME")
@click.option("--storage", default=None, help="Optuna storage URL (default: the file's, or mlruns/optuna/NAME.journal).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def study_show(target: str, storage: str | None, as_json: bool) -> None:
    """Table of the study's trials: number, state, value, params, duration."""
    from orchestrator.coordinator import counts_of, trials_table
    from orchestrator.workers import ERROR_ATTR

    ostudy = _open(target, storage)
    trials = ostudy.get_trials(deepcopy=False)
    if as_json:
        click.echo(json.dumps([{"number": t.number, "state": t.state.name.lower(), "value": t.value,
                                "params": t.params, "error": t.user_attrs.get(ERROR_ATTR),
                                "duration_s": (t.datetime_complete - t.datetime_start).total_seconds()
                                if t.datetime_complete and t.datetime_start else None} for t in trials], indent=2))
        return
    from rich.console import Console

    console = Console()
    console.print(f"study {ostudy.study_name} ({ostudy.direction.name.lower()}): {counts_of(trials)}")
    console.print(trials_table(trials))


@study.command("best")
@click.argument("target", metavar="FILE|NAME")
@click.option("--storage", default=None, help="Optuna storage URL.")
def study_best(target: str, storage: str | None) -> None:
    """The best trial's number, value and params, as JSON."""
    from orchestrator.workers import RUN_ATTR

    ostudy = _open(target, storage)
    try:
        best = ostudy.best_trial
    except ValueError:
        fail(f"study {ostudy.study_name!r} has no complete trial yet", code=1)
    click.echo(json.dumps({"study": ostudy.study_name, "trial": best.number, "value": best.value,
                           "params": best.params, "mlflow_run_id": best.user_attrs.get(RUN_ATTR)},
                          indent=2))


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

"""``orch study show|best|report|clean``: a study read back from its storage, without running anything.

A study named by its file is parsed without importing its plugins (its file was checked when the
study was created), so these commands start in a fraction of a second.
"""

from __future__ import annotations

import json

import click
from rich.console import Console

from orchestrator import names, safe_files, schema
from orchestrator.cli.options import open_optuna, storage_option
from orchestrator.errors import OrchError, UsageError
from orchestrator.execution import checkpoint_lines
from orchestrator.execution.outcomes import state_of
from orchestrator.report.page import page
from orchestrator.report.summary import duration_of, retrain_for
from orchestrator.report.terminal import header, trials_table
from orchestrator.secrets import describe
from orchestrator.storage import record


@click.command("show")
@click.argument("target", metavar="FILE|NAME")
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def show(target: str, storage: str | None, as_json: bool) -> None:
    """The study (storage, metric, budget, sampler, best) and its trials: state, value, epochs, params.

    States are orch's: complete, pruned, failed, interrupted, lost (both retried, using no
    budget), running, waiting.
    """
    ostudy, url = open_optuna(target, storage)
    trials = ostudy.get_trials(deepcopy=False)
    if as_json:
        click.echo(json.dumps([{"number": t.number, "state": state_of(t), "value": t.value, "params": t.params,
                                "error": t.user_attrs.get(schema.ERROR), "duration_s": duration_of(t)}
                               for t in trials], indent=2))
        return
    stored = record.stored_or_none(url, ostudy.study_name)
    console = Console()
    console.print(header(ostudy, url, trials, stored))
    console.print(trials_table(trials, reasons=None, max_epochs=stored.max_epochs if stored else None))
    store = checkpoint_lines.of_study(ostudy, stored)
    try:
        lines = store.lines()
        live = checkpoint_lines.live_lineages(trials)
        console.print(f"checkpoints: {len(lines)} line(s), {checkpoint_lines.size_text(sum(lines.values()))} in "
                      f"{store.where()} ({sum(k in live for k in lines)} to resume from; `orch study clean` "
                      "removes the others)", highlight=False)
    except Exception as exc:  # noqa: BLE001 - a store that does not answer: the rest is shown
        console.print(f"checkpoints: unknown ({describe(exc)})", highlight=False)


@click.command("clean")
@click.argument("target", metavar="FILE|NAME")
@storage_option
@click.option("--tracking-uri", default=None, help="The MLflow store, for a study whose checkpoints are in its "
              "MLflow run (default: the one the study recorded).")
@click.option("--all", "every", is_flag=True, help="Remove every line's checkpoint, also those a retry would "
              "resume from (refused while a trial runs or waits).")
def clean(target: str, storage: str | None, tracking_uri: str | None, every: bool) -> None:
    """Remove the study's checkpoints that no trial will resume from (--all: every one); prints what
    was removed, as JSON."""
    ostudy, url = open_optuna(target, storage)
    store = checkpoint_lines.of_study(ostudy, record.stored_or_none(url, ostudy.study_name), tracking_uri)
    try:
        lines = store.lines()
        trials = ostudy.get_trials(deepcopy=False)  # after the listing: a line made meanwhile has its trial here
        live = checkpoint_lines.live_lineages(trials)
        if every and any(t.state.name in ("RUNNING", "WAITING") for t in trials):
            raise UsageError(f"study {ostudy.study_name!r} has trials running or waiting: --all would remove the "
                             "checkpoints they write or resume from; wait for them, or stop the study first")
        gone = {k: v for k, v in lines.items() if every or k not in live}
        store.remove(gone)
    except OrchError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreadable store
        raise OrchError(f"cannot clean the checkpoints in {store.where()}: {describe(exc)}") from None
    click.echo(json.dumps({"study": ostudy.study_name, "store": store.where(), "removed": sorted(gone),
                           "bytes": sum(gone.values()), "kept": sorted(set(lines) - set(gone))}, indent=2))


@click.command("report")
@click.argument("target", metavar="FILE|NAME")
@storage_option
@click.option("--out", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder to write NAME-report.html into.")
def report(target: str, storage: str | None, out_dir: str) -> None:
    """One self-contained HTML page comparing the study's trials: summary, best trial and how to
    retrain it, trials table, learning curves, optimisation history, parallel coordinates and
    parameter importances. It opens from the file, with no server; prints its path."""
    ostudy, url = open_optuna(target, storage)
    stored = record.stored_or_none(url, ostudy.study_name)
    path = names.under(out_dir, f"{names.check(ostudy.study_name)}-report.html")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # written under a fresh name and renamed: a link planted at the report's name is replaced, not followed
        safe_files.replace(path.parent, path.name, page(ostudy, url, stored, retrain_for(ostudy, url)).encode())
    except OSError as exc:
        raise OrchError(f"cannot write the report to {path}: {exc.strerror or exc}") from None
    click.echo(str(path.resolve()))


@click.command("best")
@click.argument("target", metavar="FILE|NAME")
@storage_option
def best(target: str, storage: str | None) -> None:
    """The best trial's number, value and params, as JSON."""
    ostudy, url = open_optuna(target, storage)
    try:
        top = ostudy.best_trial
    except ValueError:
        raise OrchError(f"study {ostudy.study_name!r} has no complete trial yet") from None
    command = retrain_for(ostudy, url)
    click.echo(json.dumps({"study": ostudy.study_name, "trial": top.number, "value": top.value,
                           "params": top.params, "mlflow_run_id": top.user_attrs.get(schema.RUN_ID),
                           "retrain": command}, indent=2))
    click.echo(f"retrain and test it: {command}", err=True)


"""The ``orch`` command line. Only click is imported at start-up; each command imports what it needs."""

from __future__ import annotations

import errno
import json
import signal
import sys

import click

from orchestrator import __version__

EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    from orchestrator.secrets import redact

    click.echo(f"error: {redact(message)}", err=True)
    sys.exit(code)


def preflight(spec, file: str, study=None) -> None:
    """Missing data, a module that does not fit its dataset, a plugin that breaks its contract
    (of the run, or any a ``study``'s space chooses): exit 2 before anything is written."""
    from orchestrator import runner

    also = {}
    if study is not None:
        for section, kind in (("cell", "cells"), ("module", "modules")):
            param = study.section.space.get(f"{section}.plugin")
            also[kind] = set(getattr(param, "choices", ()) or ())
    try:
        runner.preflight(spec, also)
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


@plugins.command("check")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins_check(names: tuple[str, ...], as_json: bool) -> None:
    """Run the contract checks of NAMES (default: every installed plugin) on tiny inputs.

    Exit 1 if any plugin fails a check or does not load; a dataset whose data is not on this
    machine is reported as such.
    """
    from orchestrator import checks, registry

    found = registry.discover_all()
    if names:
        unknown = [n for n in names if n not in {p.name for p in found}]
        if unknown:
            fail(f"no plugin named {', '.join(map(repr, unknown))}; installed: "
                 f"{', '.join(sorted({p.name for p in found}))}")
        found = [p for p in found if p.name in names]
    verdicts = [checks.check(info) for info in found]
    if as_json:
        click.echo(json.dumps([v.as_dict() for v in verdicts], indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

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
    from orchestrator.scaffold import new_plugin

    try:
        root = new_plugin(kind, name, folder)
    except (ValueError, FileExistsError) as exc:
        fail(str(exc))
    click.echo(f"wrote {root}: pip install -e {root}[test] && pytest {root}/tests && "
               f"orch plugins check {name} && orch study run {root}/studies/{name}.yaml", err=True)
    click.echo(str(root))


@plugins.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--refresh", is_flag=True, help="Load every plugin again rather than trust the cached listing "
              "(it is recomputed anyway whenever a plugin, an installed package or orch changes).")
def plugins_list(as_json: bool, refresh: bool) -> None:
    """List every plugin with its distribution, version and status (broken ones with the error)."""
    from orchestrator.listing import listing

    found = listing(refresh)
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


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--storage", default=None, help="Optuna storage to check (default: $ORCH_STORAGE, else the journal "
              "under mlruns/optuna/).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI to check (default: $MLFLOW_TRACKING_URI, "
              "else SQLite in ./mlruns).")
def doctor(as_json: bool, storage: str | None, tracking_uri: str | None) -> None:
    """Versions, GPUs, data, storage, tracking and plugins on one screen; exit 1 if the main job cannot run."""
    from orchestrator.doctor import as_dicts, collect

    found = collect(storage, tracking_uri)
    failed = [f for f in found if f.status == "fail"]
    if as_json:
        click.echo(json.dumps({"ok": not failed, "findings": as_dicts(found)}, indent=2))
    else:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

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


# ---- train --------------------------------------------------------------------------------
SET_HELP = "Override a setting, e.g. --set cell.hidden_size=200 (repeatable)."


STORAGE_HELP = ("Optuna storage URL, e.g. postgresql://user:pass@host/db (default: $ORCH_STORAGE, else the "
                "file's study.storage, else a journal file under mlruns/optuna/).")


def _storage_option(f):
    return click.option("--storage", default=None, envvar="ORCH_STORAGE", show_envvar=False, help=STORAGE_HELP)(f)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False), required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: SQLite in ./mlruns, or the "
              "study's with --from-study).")
@click.option("--experiment", default=None, help="MLflow experiment (default: the file's name, or the study's).")
@click.option("--test/--no-test", default=False, help="Also evaluate on the test split at the end.")
@click.option("--from-study", "from_study", default=None, metavar="NAME",
              help="Instead of FILE: the exact settings of a trial of study NAME (its best by default).")
@click.option("--trial", "trial_number", type=int, default=None, help="With --from-study: the trial's number.")
@_storage_option
def train(file: str | None, overrides: tuple[str, ...], tracking_uri: str | None, experiment: str | None,
          test: bool, from_study: str | None, trial_number: int | None, storage: str | None) -> None:
    """Train FILE's fixed settings once (a study section is ignored) and log it to MLflow.

    With --from-study NAME [--trial N], retrain a study's trial (its best by default) with the
    exact settings it ran with, as stored with the study, in the study's MLflow experiment.
    """
    from pathlib import Path

    from orchestrator.config import SpecError, load_spec

    tags = {"orch.command": "train"}
    run_name = None
    if from_study:
        if file:
            fail("give a FILE or --from-study NAME, not both")
        spec, file, tags, run_name, study_name, tracking_uri = _from_study(
            from_study, trial_number, storage, overrides, tracking_uri)
        experiment = experiment or study_name
    elif not file:
        fail("give a run FILE, or --from-study NAME to retrain a study's trial")
    else:
        if trial_number is not None:
            fail("--trial goes with --from-study NAME")
        try:
            spec, _ = load_spec(file, overrides)
        except SpecError as exc:
            fail(str(exc))
    preflight(spec, file)
    from orchestrator import runner, tracking
    from orchestrator.contracts.module import NonFiniteLossError
    from orchestrator.secrets import redact_url

    uri = tracking.resolve_tracking_uri(tracking_uri or spec.tracking_uri)
    try:
        tracking.check_reachable(uri)
    except SpecError as exc:
        fail(str(exc))
    name = experiment or spec.name or Path(file).stem
    click.echo(f"training {spec.cell.plugin} / {spec.module.plugin} on {spec.dataset.plugin}; "
               f"MLflow: {redact_url(uri)} experiment {name!r}", err=True)
    mlf = tracking.client(uri)
    run_id = runner.start_run(mlf, name, run_name=run_name, tags=tags)
    try:
        result = runner.tracked_fit(spec, mlf, run_id, test=test)
    except BaseException as exc:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        killed = isinstance(exc, (KeyboardInterrupt, SystemExit))
        runner.end_run(mlf, run_id, "killed" if killed else "failed", exc)
        if isinstance(exc, SIGTERMException):  # Lightning's, a SystemExit without a code
            sys.exit(128 + signal.SIGTERM)
        if isinstance(exc, KeyboardInterrupt):
            sys.exit(128 + signal.SIGINT)
        if killed:
            raise
        if isinstance(exc, (runner.IncompatibleError, NonFiniteLossError, ValueError, OSError)):
            fail(f"{type(exc).__name__}: {exc} (MLflow run {run_id})", code=1)
        raise
    runner.end_run(mlf, run_id, "complete")
    click.echo(json.dumps({"run_id": run_id, **result.metrics}, indent=2))


def _from_study(name: str, number: int | None, storage: str | None, overrides: tuple[str, ...],
                tracking_uri: str | None):
    """The run spec, label, tags, run name, experiment and tracking URI that retrain trial ``number``
    of study ``name`` (``tracking_uri``: given, else ``$MLFLOW_TRACKING_URI``, else the study's)."""
    from orchestrator import record
    from orchestrator.config import SpecError
    from orchestrator.study import default_storage_url

    url = storage or default_storage_url(name)
    try:
        ostudy = record.load(url, name)
        study = record.stored_study(url, name)
    except SpecError as exc:
        fail(str(exc))
    trials = ostudy.get_trials(deepcopy=False)
    if number is None:
        try:
            trial = ostudy.best_trial
        except ValueError:
            fail(f"study {name!r} has no complete trial yet; pick one with --trial N", code=1)
    else:
        found = [t for t in trials if t.number == number]
        if not found:
            fail(f"study {name!r} has no trial {number} (trials 0 to {len(trials) - 1})")
        trial = found[0]
        if trial.state.name in ("RUNNING", "WAITING"):
            fail(f"trial {number} of study {name!r} is still {trial.state.name.lower()}: retrain it once it ends")
        if not trial.params and study.section.space:
            fail(f"trial {number} of study {name!r} failed before its parameters were drawn: nothing to retrain")
    searched = {o.split("=", 1)[0].strip() for o in overrides} & set(study.section.space)
    if searched:
        ran = ", ".join(f"{k}={trial.params[k]}" if k in trial.params else f"{k} unset" for k in sorted(searched))
        fail(f"--set {', '.join(sorted(searched))}: searched by the study; trial {trial.number} ran with {ran}")
    from orchestrator.config import apply_overrides, check_trainer, override_keys
    from orchestrator.study import study_from

    try:
        if overrides:
            study = study_from(apply_overrides(study.data, overrides), study.src)
            study.src.overridden = override_keys(overrides)
        spec = study.spec_for(trial.params)
        check_trainer(spec.trainer, study.src)  # this machine: can it run the trial's accelerator?
    except SpecError as exc:
        fail(str(exc))
    try:
        recorded = ostudy.user_attrs.get(record.TRACKING_ATTR)
        uri = record.study_tracking_uri(study, recorded, tracking_uri, create=False)
    except SpecError as exc:
        fail(str(exc))
    tags = {"orch.command": "train", "orch.role": "retrain", "orch.study": name, "orch.trial": str(trial.number)}
    return spec, f"study {name} trial {trial.number}", tags, f"retrain trial-{trial.number}", study.name, uri


# ---- study -------------------------------------------------------------------------------
@main.group()
def study() -> None:
    """Optuna studies over run files: run, create, worker, show, best, copy."""


def _devices(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        fail(f"--devices {value!r}: expected GPU ids such as 0,2")


TRACKING_HELP = "MLflow tracking URI, e.g. http://host:5000 (default: SQLite in ./mlruns)."


def _slot_options(f):
    """The worker slots of ``study run`` and ``study worker``."""
    for option in reversed([
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Stop claiming new trials after this many seconds."),
        click.option("--workers", "workers_n", type=click.IntRange(min=1), default=None,
                     help="CPU worker processes (torch threads are split between them)."),
        click.option("--devices", default=None, help="GPU ids to use, e.g. 0,2 (default: all visible GPUs)."),
        click.option("--trials-per-device", type=click.IntRange(min=1), default=None,
                     help="Trials packed on each GPU at once (default: the file's, else 1)."),
        click.option("--tracking-uri", default=None, help=TRACKING_HELP),
    ]):
        f = option(f)
    return _storage_option(f)


def _load(file: str, overrides=()):
    """A validated study file, with its data checked on this machine."""
    from orchestrator.config import SpecError
    from orchestrator.study import load_study

    try:
        spec = load_study(file, overrides)
    except SpecError as exc:
        fail(str(exc))
    preflight(spec.base, file, spec)
    return spec


def _run(spec, *, create: bool, trials=None, **options) -> None:
    """Run or join a study; exit 0 done, 1 every trial of this run failed (or a fault stopped the
    study), 2 bad input, 130/143 stopped by SIGINT/SIGTERM."""
    from orchestrator import stopping
    from orchestrator.config import SpecError
    from orchestrator.coordinator import ResourceStop, run_study

    previous = stopping.install_coordinator_handlers()
    try:
        outcome = run_study(spec, trials=trials, create=create, echo=lambda m: click.echo(m, err=True),
                            live=sys.stderr.isatty(), **options)
    except SpecError as exc:
        fail(str(exc))
    except stopping.Stopped as exc:
        click.echo(f"{exc}: the interrupted trials run again with the same command", err=True)
        sys.exit(exc.exit_code)
    except ResourceStop as exc:
        fail(f"{exc}; the study stopped: fix it, then run the same command again (its interrupted trials are "
             "retried, and use no budget)", code=1)
    except Exception as exc:  # noqa: BLE001 - only faults that retrying cannot fix are turned into a message
        from orchestrator.workers import resource_fault

        fault = resource_fault(exc)
        if fault is None:
            raise
        fail(f"{fault} ({type(exc).__name__}); the study stopped: fix it, then run the same command again",
             code=1)
    finally:
        stopping.restore(previous)
    click.echo(json.dumps({"study": outcome.name, **outcome.counts, "best_value": outcome.best_value,
                           "best_params": outcome.best_params, "parent_run_id": outcome.parent_run_id}, indent=2))
    if outcome.all_failed:
        summary = "; ".join(f"{n} x {reason}" for reason, n in sorted(outcome.failures.items(), key=lambda x: -x[1]))
        fail(f"every trial of this run failed ({len(outcome.ran)}): {summary}; `orch study show {outcome.name}` "
             "has the reasons, and each trial's MLflow run its traceback", code=1)


@study.command("run")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Total budget of the study (re-running continues up to it).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@_slot_options
def study_run(file, trials, overrides, storage, timeout, workers_n, devices, trials_per_device,
              tracking_uri) -> None:
    """Run (or resume) the study in FILE until its trial budget is met.

    Creates the study in its storage if needed and sets its budget; `orch study worker` processes
    on this or other machines may join it at any time.
    """
    spec = _load(file, overrides)
    _run(spec, create=True, trials=trials, timeout=timeout, workers_n=workers_n, devices=_devices(devices),
         trials_per_device=trials_per_device, storage_url=storage, tracking_uri=tracking_uri)


@study.command("create")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Total budget of the study.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@_storage_option
@click.option("--tracking-uri", default=None, help=TRACKING_HELP)
def study_create(file, trials, overrides, storage, tracking_uri) -> None:
    """Create the study in FILE (its MLflow experiment and parent run too) without running trials.

    Workers then join it with `orch study worker NAME --storage URL`, from any machine.
    """
    from orchestrator import record
    from orchestrator.config import SpecError
    from orchestrator.coordinator import study_budget
    from orchestrator.secrets import redact_url
    from orchestrator.study import default_storage_url

    spec = _load(file, overrides)
    url = storage or spec.section.storage or default_storage_url(spec.name)
    budget = study_budget(spec, trials)
    if budget is None:
        fail(f"{file}: no budget: set study.trials or pass --trials (workers run until the budget is met)")
    try:
        joined = record.open_study(spec, url, create=True, tracking_uri=tracking_uri, budget=budget)
    except SpecError as exc:
        fail(str(exc))
    click.echo(f"study {spec.name} is ready; join it from any machine with:\n"
               f"  orch study worker {spec.name} --storage {redact_url(url)} --tracking-uri "
               f"{redact_url(joined.tracking_uri)}", err=True)
    click.echo(json.dumps({"study": spec.name, "storage": redact_url(url), "budget": budget,
                           "tracking_uri": redact_url(joined.tracking_uri),
                           "parent_run_id": joined.parent_run_id}, indent=2))


@study.command("worker")
@click.argument("target", metavar="FILE|NAME")
@_slot_options
def study_worker(target, storage, timeout, workers_n, devices, trials_per_device, tracking_uri) -> None:
    """Join the existing study FILE|NAME and run its trials until its shared budget is met.

    With a NAME, the study file is the one stored with the study (--storage, or $ORCH_STORAGE, is
    then needed); with a FILE, it must match the stored one. Start as many as you like, on any
    machine that reaches the storage and the tracking server.
    """
    from orchestrator import record
    from orchestrator.config import SpecError

    if target.endswith((".yaml", ".yml")):
        spec = _load(target)
    else:
        if not storage:
            fail(f"study {target!r}: pass --storage URL (or set $ORCH_STORAGE) to say where it is")
        try:
            spec = record.stored_study(storage, target)
        except SpecError as exc:
            fail(str(exc))
        preflight(spec.base, target, spec)
    _run(spec, create=False, timeout=timeout, workers_n=workers_n, devices=_devices(devices),
         trials_per_device=trials_per_device, storage_url=storage, tracking_uri=tracking_uri)


@study.command("copy")
@click.argument("name")
@click.option("--from", "source", required=True, help="Storage URL the study is in (journal:PATH for a journal file).")
@click.option("--to", "dest", required=True, help="Storage URL to copy it to, e.g. postgresql://user:pass@host/db.")
@click.option("--to-name", default=None, help="Name of the copy (default: the same).")
def study_copy(name, source, dest, to_name) -> None:
    """Copy study NAME, with every trial and orch's record of it, to another storage.

    For moving a study from the embedded journal file to PostgreSQL before adding machines: the
    copy goes on with the same budget, MLflow parent run and trial numbers. With --to-name it is a
    new study (its own MLflow experiment), run with study.name set to the new name.
    """
    from orchestrator import record
    from orchestrator.config import SpecError
    from orchestrator.secrets import redact_url

    try:
        n = record.copy_study(name, source, dest, to_name)
    except SpecError as exc:
        fail(str(exc))
    click.echo(f"copied study {name!r} ({n} trials) from {redact_url(source)} to {redact_url(dest)}"
               + (f" as {to_name!r}" if to_name else ""), err=True)


@study.command("repair")
@click.argument("target", metavar="FILE|NAME")
@_storage_option
@click.option("--force", is_flag=True, help="Drop damaged lines even where that renumbers trials.")
def study_repair(target: str, storage: str | None, force: bool) -> None:
    """Rewrite a damaged journal file with every valid record, after a backup beside it.

    For the default storage (a journal file), after `orch` refused it as damaged. A record cut
    off at the end by a crash needs no repair: it is cut away automatically.
    """
    from orchestrator import journal
    from orchestrator.config import SpecError
    from orchestrator.locks import file_of

    _, url = _locate(target, storage)
    if not url.startswith("journal:"):
        fail(f"{url}: `orch study repair` mends journal files; a database is repaired with its own tools")
    try:
        report = journal.repair(file_of(url), force=force)
    except SpecError as exc:
        fail(str(exc))
    click.echo(f"kept {report['kept']} records; dropped line(s) {report['dropped_lines'] or 'none'}; "
               f"backup: {report['backup']}", err=True)
    click.echo(json.dumps(report, indent=2))


def _locate(target: str, storage: str | None) -> tuple[str, str]:
    """The name and storage URL of a study named by its file or its name (default: its journal file)."""
    from orchestrator.config import SpecError, load_yaml
    from orchestrator.study import default_storage_url, parsed_study

    if target.endswith((".yaml", ".yml")):
        try:
            spec = parsed_study(*load_yaml(target))  # only its name and storage are needed
        except SpecError as exc:
            fail(str(exc))
        return spec.name, storage or spec.section.storage or default_storage_url(spec.name)
    return target, storage or default_storage_url(target)


def _open(target: str, storage: str | None):
    """The Optuna study named by a study file or by its name."""
    import optuna

    from orchestrator import record
    from orchestrator.config import SpecError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name, url = _locate(target, storage)
    try:
        return record.load(url, name)
    except SpecError as exc:
        fail(str(exc))


@study.command("show")
@click.argument("target", metavar="FILE|NAME")
@_storage_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def study_show(target: str, storage: str | None, as_json: bool) -> None:
    """The study (storage, metric, budget, sampler, best) and its trials: state, value, epochs, params."""
    from orchestrator.claims import ERROR_ATTR
    from orchestrator.coordinator import trials_table

    ostudy = _open(target, storage)
    trials = ostudy.get_trials(deepcopy=False)
    if as_json:
        click.echo(json.dumps([{"number": t.number, "state": t.state.name.lower(), "value": t.value,
                                "params": t.params, "error": t.user_attrs.get(ERROR_ATTR),
                                "duration_s": (t.datetime_complete - t.datetime_start).total_seconds()
                                if t.datetime_complete and t.datetime_start else None} for t in trials], indent=2))
        return
    from rich.console import Console

    from orchestrator import record
    from orchestrator.coordinator import max_epochs

    url = _locate(target, storage)[1]
    try:
        stored = record.stored_study(url, ostudy.study_name, checked=False)
    except Exception:  # noqa: BLE001 - a study that orch did not create: no file stored with it
        stored = None
    console = Console()
    console.print(_header(ostudy, url, trials, stored))
    console.print(trials_table(trials, reasons=None, max_epochs=max_epochs(stored) if stored else None))


def _header(ostudy, url: str, trials, stored):
    """The study at a glance (:func:`orchestrator.report.summary`) as a two-column grid."""
    from rich.table import Table

    from orchestrator.report import summary

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, text in summary(ostudy, url, stored, trials):
        grid.add_row(key, text)
    return grid


@study.command("report")
@click.argument("target", metavar="FILE|NAME")
@_storage_option
@click.option("--out", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder to write NAME-report.html into.")
def study_report(target: str, storage: str | None, out_dir: str) -> None:
    """One self-contained HTML page comparing the study's trials: summary, best trial and how to
    retrain it, trials table, learning curves, optimisation history, parallel coordinates and
    parameter importances. It opens from the file, with no server; prints its path."""
    from pathlib import Path

    from orchestrator import record, report
    from orchestrator.study import default_storage_url

    ostudy = _open(target, storage)
    name, url = ostudy.study_name, _locate(target, storage)[1]
    try:
        stored = record.stored_study(url, name, checked=False)
    except Exception:  # noqa: BLE001 - a study that orch did not create: no file stored with it
        stored = None
    try:
        number = ostudy.best_trial.number
    except ValueError:
        number = None
    retrain = report.retrain_command(name, number, None if url == default_storage_url(name) else url) \
        if number is not None else None
    path = Path(out_dir) / f"{name}-report.html"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.page(ostudy, url, stored, retrain), encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write the report to {path}: {exc.strerror or exc}", code=1)
    click.echo(str(path.resolve()))


@study.command("best")
@click.argument("target", metavar="FILE|NAME")
@_storage_option
def study_best(target: str, storage: str | None) -> None:
    """The best trial's number, value and params, as JSON."""
    from orchestrator.claims import RUN_ATTR

    ostudy = _open(target, storage)
    try:
        best = ostudy.best_trial
    except ValueError:
        fail(f"study {ostudy.study_name!r} has no complete trial yet", code=1)
    from orchestrator.report import retrain_command
    from orchestrator.study import default_storage_url

    url = _locate(target, storage)[1]
    command = retrain_command(ostudy.study_name, best.number,
                              None if url == default_storage_url(ostudy.study_name) else url)
    click.echo(json.dumps({"study": ostudy.study_name, "trial": best.number, "value": best.value,
                           "params": best.params, "mlflow_run_id": best.user_attrs.get(RUN_ATTR),
                           "retrain": command}, indent=2))
    click.echo(f"retrain and test it: {command}", err=True)



# ---- ui -----------------------------------------------------------------------------------
@main.command()
@click.argument("target", metavar="[STUDY]", required=False)
@click.option("--tracking-uri", default=None, help="Store to browse (default: SQLite in ./mlruns).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port; the URL printed says which).")
@click.option("--open", "open_browser", is_flag=True, help="Open the link in a web browser.")
def ui(target: str | None, tracking_uri: str | None, host: str, port: int, open_browser: bool) -> None:
    """Open the MLflow UI on the project's store (bound to 127.0.0.1 unless told otherwise).

    With STUDY (a name or a study file), also print the link to its trial runs: sorted by the
    study's metric, with the metric, the searched parameters and each trial's state as columns.
    """
    import subprocess
    import time
    import urllib.request
    from pathlib import Path

    from orchestrator.secrets import redact_url
    from orchestrator.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if target and uri.startswith(("http://", "https://")):
        from orchestrator.config import SpecError
        from orchestrator.tracking import check_reachable

        try:
            check_reachable(uri)
        except SpecError as exc:
            fail(str(exc))
    experiment = _ui_experiment(target, uri) if target else None
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(uri)  # a link for a browser: no user or password in it
        base = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        click.echo(f"MLflow UI of the tracking server: {redact_url(uri)}", err=True)
        link = _ui_link(base, target, experiment)
        click.echo(link)
        if open_browser:
            import webbrowser

            webbrowser.open(link)
        return
    port = _free_port(host, port)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///"):]).parent / "artifacts"
        cmd += ["--default-artifact-root", artifacts.resolve().as_uri()]
    base = f"http://{host}:{port}"
    click.echo(f"MLflow UI on {base}", err=True)
    server = subprocess.Popen(cmd, stdout=sys.stderr)  # stdout holds only the link: scripts read it

    def stop(signum, frame):  # SIGTERM to orch alone (a supervisor): the server goes with it
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        link = _ui_link(base, target, experiment)
        if target:
            click.echo(link)
        if open_browser:
            deadline = time.time() + 120
            while time.time() < deadline and server.poll() is None:
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=2).close()
                    break
                except OSError:
                    time.sleep(0.5)
            import webbrowser

            webbrowser.open(link)
        code = server.wait()
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except SystemExit as exc:
        code = exc.code
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    sys.exit(code)


def _ui_experiment(target: str, uri: str) -> str:
    """The MLflow experiment id of study ``target`` (a name or a study file) in the store ``uri``."""
    from orchestrator import tracking
    from orchestrator.secrets import redact_url

    from orchestrator.views import VIEW_KEY, VIEW_TAG_PREFIX, save_study_view

    name, spec = target, None
    if target.endswith((".yaml", ".yml")):
        from orchestrator.config import SpecError, load_yaml
        from orchestrator.study import parsed_study

        try:
            spec = parsed_study(*load_yaml(target))  # its name and space: no plugin or GPU needed to look
        except SpecError as exc:
            fail(str(exc))
        name = spec.name
    mlf = tracking.client(uri)
    try:
        exp = mlf.get_experiment_by_name(name)
    except Exception as exc:  # noqa: BLE001 - an unreadable store, a refused login, ...
        from orchestrator.secrets import describe

        fail(f"cannot read the MLflow store {redact_url(uri)}: {describe(exc)}")
    if exp is None:
        known = ", ".join(sorted(e.name for e in mlf.search_experiments() if e.name != "Default")) or "none"
        fail(f"no study {name!r} in the MLflow store {redact_url(uri)}; its studies: {known}")
    if VIEW_TAG_PREFIX + VIEW_KEY not in exp.tags:  # a study of an older orch: its view, saved now
        if spec is None:
            from orchestrator import record
            from orchestrator.study import default_storage_url

            try:
                spec = record.stored_study(default_storage_url(name), name, checked=False)
            except Exception:  # noqa: BLE001 - not in the default storage: the link opens the plain runs table
                spec = None
        if spec is not None:
            save_study_view(mlf, exp.experiment_id, spec)
    return exp.experiment_id


def _ui_link(base: str, target: str | None, experiment: str | None) -> str:
    from orchestrator.views import study_url

    if experiment is None:
        return base
    link = study_url(base, experiment)
    click.echo(f"study {target}: {link}", err=True)
    return link


def _free_port(host: str, port: int) -> int:
    """``port`` if it can be bound on ``host`` (a port 0 becomes a free one), else exit 2 saying why."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
            return s.getsockname()[1]
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
             + (" (another program has it: pass another --port, or --port 0 for any free one)"
                if exc.errno == errno.EADDRINUSE else ""))


if __name__ == "__main__":
    main()

"""``orch study run|create|worker``: a study created, run on this machine, or joined from any machine."""

from __future__ import annotations

import json
import sys

import click

from orchestrator import names
from orchestrator.cli.options import (
    TRACKING_HELP,
    checked_study,
    is_file,
    preflight,
    set_option,
    slot_options,
    storage_option,
)
from orchestrator.errors import ResourceFault, Stopped, UsageError, resource_fault
from orchestrator.execution import stopping
from orchestrator.execution.coordinator import run_study, study_budget
from orchestrator.execution.opening import open_study
from orchestrator.secrets import redact_url
from orchestrator.storage import record
from orchestrator.storage.urls import default_storage_url


def _run(loaded, *, create: bool, trials=None, **options) -> None:
    """Run or join a study; exit 0 done, 1 every trial of this run failed (or a fault stopped the
    study), 2 bad input, 130/143 stopped by SIGINT/SIGTERM."""
    previous = stopping.install_coordinator_handlers()
    try:
        outcome = run_study(loaded, trials=trials, create=create, echo=lambda m: click.echo(m, err=True),
                            live=sys.stderr.isatty(), **options)
    except Stopped as exc:
        click.echo(f"{exc}: the interrupted trials run again with the same command", err=True)
        sys.exit(exc.exit_code)
    except ResourceFault as exc:
        raise ResourceFault(f"{exc}; the study stopped: fix it, then run the same command again (its interrupted "
                            "trials are retried, and use no budget)") from None
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - only faults that retrying cannot fix are turned into a message
        fault = resource_fault(exc)
        if fault is None:
            raise
        raise ResourceFault(f"{fault} ({type(exc).__name__}); the study stopped: fix it, then run the same command "
                            "again") from None
    finally:
        stopping.restore(previous)
    click.echo(json.dumps({"study": outcome.name, **outcome.counts, "best_value": outcome.best_value,
                           "best_params": outcome.best_params, "parent_run_id": outcome.parent_run_id}, indent=2))
    if outcome.all_failed:
        summary = "; ".join(f"{n} x {reason}" for reason, n in sorted(outcome.failures.items(), key=lambda x: -x[1]))
        raise ResourceFault(f"every trial of this run failed ({len(outcome.ran)}): {summary}; `orch study show "
                            f"{outcome.name}` has the reasons, and each trial's MLflow run its traceback")


@click.command("run")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Total budget of the study (re-running continues up to it).")
@set_option
@slot_options
def run(file, trials, overrides, storage, timeout, workers_n, devices, trials_per_device,
              tracking_uri) -> None:
    """Run (or resume) the study in FILE until its trial budget is met.

    Creates the study in its storage if needed and sets its budget; `orch study worker` processes
    on this or other machines may join it at any time.
    """
    loaded = checked_study(file, overrides)
    _run(loaded, create=True, trials=trials, timeout=timeout, workers_n=workers_n, devices=devices,
         trials_per_device=trials_per_device, storage_url=storage, tracking_uri=tracking_uri)


@click.command("create")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Total budget of the study.")
@set_option
@storage_option
@click.option("--tracking-uri", default=None, help=TRACKING_HELP)
def create(file, trials, overrides, storage, tracking_uri) -> None:
    """Create the study in FILE (its MLflow experiment and parent run too) without running trials.

    Workers then join it with `orch study worker NAME --storage URL`, from any machine.
    """
    loaded = checked_study(file, overrides)
    url = storage or loaded.section.storage or default_storage_url(loaded.name)
    budget = study_budget(loaded, trials)
    if budget is None:
        raise UsageError(f"{file}: no budget: set study.trials or pass --trials (workers run until the budget is met)")
    joined = open_study(loaded, url, create=True, tracking_uri=tracking_uri, budget=budget)
    click.echo(f"study {loaded.name} is ready; join it from any machine with:\n"
               f"  orch study worker {loaded.name} --storage {redact_url(url)} --tracking-uri "
               f"{redact_url(joined.tracking_uri)}", err=True)
    click.echo(json.dumps({"study": loaded.name, "storage": redact_url(url), "budget": budget,
                           "tracking_uri": redact_url(joined.tracking_uri),
                           "parent_run_id": joined.parent_run_id}, indent=2))


@click.command("worker")
@click.argument("target", metavar="FILE|NAME")
@slot_options
def worker(target, storage, timeout, workers_n, devices, trials_per_device, tracking_uri) -> None:
    """Join the existing study FILE|NAME and run its trials until its shared budget is met.

    With a NAME, the study file is the one stored with the study (--storage, or $ORCH_STORAGE, is
    then needed); with a FILE, it must match the stored one. Start as many as you like, on any
    machine that reaches the storage and the tracking server.
    """
    if is_file(target):
        loaded = checked_study(target)
    else:
        names.check(target)
        if not storage:
            raise UsageError(f"study {target!r}: pass --storage URL (or set $ORCH_STORAGE) to say where it is")
        loaded = record.stored_study(storage, target)
        preflight(loaded.base, target, loaded)
    _run(loaded, create=False, timeout=timeout, workers_n=workers_n, devices=devices,
         trials_per_device=trials_per_device, storage_url=storage, tracking_uri=tracking_uri)

"""``orch train``: one run of a file's fixed settings, or a study's trial again, logged to MLflow."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from orchestrator import schema
from orchestrator.cli.options import preflight, set_option, storage_option
from orchestrator.cpus import limit_threads
from orchestrator.errors import IncompatibleError, OrchError, UsageError
from orchestrator.secrets import redact_url
from orchestrator.spec.files import apply_overrides, override_keys
from orchestrator.spec.run import check_trainer, load_spec
from orchestrator.spec.study import study_from
from orchestrator.storage import record
from orchestrator.storage.urls import default_storage_url
from orchestrator.tracking import client
from orchestrator.tracking.parent import study_tracking_uri
from orchestrator.tracking.runs import end_run, start_run


@click.command()
@click.argument("file", type=click.Path(dir_okay=False), required=False)
@set_option
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: SQLite in ./mlruns, or the "
              "study's with --from-study).")
@click.option("--experiment", default=None, help="MLflow experiment (default: the file's name, or the study's).")
@click.option("--test/--no-test", default=False, help="Also evaluate on the test split at the end.")
@click.option("--from-study", "from_study", default=None, metavar="NAME",
              help="Instead of FILE: the exact settings of a trial of study NAME (its best by default).")
@click.option("--trial", "trial_number", type=int, default=None, help="With --from-study: the trial's number.")
@storage_option
def train(file: str | None, overrides: tuple[str, ...], tracking_uri: str | None, experiment: str | None,
          test: bool, from_study: str | None, trial_number: int | None, storage: str | None) -> None:
    """Train FILE's fixed settings once (a study section is ignored) and log it to MLflow.

    With --from-study NAME [--trial N], retrain a study's trial (its best by default) with the
    exact settings it ran with, as stored with the study, in the study's MLflow experiment.
    """
    threads = limit_threads()  # OMP_NUM_THREADS, unless the user's, before anything imports torch
    tags = {schema.COMMAND: "train"}
    run_name = None
    if from_study:
        if file:
            raise UsageError("give a FILE or --from-study NAME, not both")
        spec, file, tags, run_name, study_name, tracking_uri = _from_study(
            from_study, trial_number, storage, overrides, tracking_uri)
        experiment = experiment or study_name
    elif not file:
        raise UsageError("give a run FILE, or --from-study NAME to retrain a study's trial")
    else:
        if trial_number is not None:
            raise UsageError("--trial goes with --from-study NAME")
        spec, _ = load_spec(file, overrides)
    preflight(spec, file)
    import torch

    from orchestrator.contracts.module import NonFiniteLossError
    from orchestrator.training.fit import tracked_fit

    torch.set_num_threads(threads)  # the usable cores, not every core of the node
    uri = client.resolve_tracking_uri(tracking_uri or spec.tracking_uri)
    client.check_reachable(uri)
    name = experiment or spec.name or Path(file).stem
    click.echo(f"training {spec.cell.plugin} / {spec.module.plugin} on {spec.dataset.plugin}; "
               f"MLflow: {redact_url(uri)} experiment {name!r}", err=True)
    mlf = client.client(uri)
    run_id = start_run(mlf, name, run_name=run_name, tags=tags)
    try:
        result = tracked_fit(spec, mlf, run_id, test=test)
    except BaseException as exc:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        killed = isinstance(exc, (KeyboardInterrupt, SystemExit))
        end_run(mlf, run_id, "killed" if killed else "failed", exc)
        if isinstance(exc, SIGTERMException):  # Lightning's, a SystemExit without a code
            sys.exit(128 + signal.SIGTERM)
        if isinstance(exc, KeyboardInterrupt):
            sys.exit(128 + signal.SIGINT)
        if killed:
            raise
        if isinstance(exc, (IncompatibleError, NonFiniteLossError, ValueError, OSError)):
            raise OrchError(f"{type(exc).__name__}: {exc} (MLflow run {run_id})") from None
        raise
    end_run(mlf, run_id, "complete")
    click.echo(json.dumps({"run_id": run_id, **result.metrics}, indent=2))


def _from_study(name: str, number: int | None, storage: str | None, overrides: tuple[str, ...],
                tracking_uri: str | None):
    """The run spec, label, tags, run name, experiment and tracking URI that retrain trial ``number``
    of study ``name`` (``tracking_uri``: given, else ``$MLFLOW_TRACKING_URI``, else the study's)."""
    url = storage or default_storage_url(name)
    ostudy = record.load(url, name)
    study = record.stored_study(url, name)
    trials = ostudy.get_trials(deepcopy=False)
    if number is None:
        try:
            trial = ostudy.best_trial
        except ValueError:
            raise OrchError(f"study {name!r} has no complete trial yet; pick one with --trial N") from None
    else:
        found = [t for t in trials if t.number == number]
        if not found:
            raise UsageError(f"study {name!r} has no trial {number} (trials 0 to {len(trials) - 1})")
        trial = found[0]
        if trial.state.name in ("RUNNING", "WAITING"):
            raise UsageError(f"trial {number} of study {name!r} is still {trial.state.name.lower()}: retrain it once "
                             "it ends")
        if not trial.params and study.section.space:
            raise UsageError(f"trial {number} of study {name!r} failed before its parameters were drawn: nothing to "
                             "retrain")
    searched = {o.split("=", 1)[0].strip() for o in overrides} & set(study.section.space)
    if searched:
        ran = ", ".join(f"{k}={trial.params[k]}" if k in trial.params else f"{k} unset" for k in sorted(searched))
        raise UsageError(f"--set {', '.join(sorted(searched))}: searched by the study; trial {trial.number} ran "
                         f"with {ran}")
    if overrides:
        study = study_from(apply_overrides(study.data, overrides), study.src)
        study.src.overridden = override_keys(overrides)
    spec = study.spec_for(trial.params)
    check_trainer(spec.trainer, study.src)  # this machine: can it run the trial's accelerator?
    uri = study_tracking_uri(study, ostudy.user_attrs.get(schema.TRACKING_URI), tracking_uri, create=False)
    tags = {schema.COMMAND: "train", schema.ROLE: "retrain", schema.STUDY: name, schema.TRIAL: str(trial.number)}
    return spec, f"study {name} trial {trial.number}", tags, f"retrain trial-{trial.number}", study.name, uri

"""MLflow runs: created, given a fit's inputs, closed in a final state, and given earlier epochs.

Every run orch makes starts with :func:`start_run` and ends with :func:`end_run`; for a trial's
run, :mod:`orchestrator.execution.outcomes` decides the state (so that Optuna and MLflow agree).
The tags and artifact names are :mod:`orchestrator.schema`'s.
"""

from __future__ import annotations

import traceback
from importlib.metadata import version as dist_version

import yaml

from orchestrator import schema
from orchestrator.secrets import redact, redact_settings
from orchestrator.tracking.client import experiment_id, log_params


def start_run(mlf, experiment: str, *, run_name: str | None = None, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    """Create an MLflow run (a child run when ``parent_run_id`` is given) and return its id."""
    all_tags = {schema.VERSION: dist_version("orch")}
    if parent_run_id:
        all_tags[schema.PARENT_TAG] = parent_run_id
    all_tags.update(tags or {})
    return mlf.create_run(experiment_id(mlf, experiment), run_name=run_name, tags=all_tags).info.run_id


def end_run(mlf, run_id: str, state: str, error: BaseException | str | None = None) -> None:
    """Close a run with ``state`` (one of :data:`~orchestrator.schema.RUN_STATUS`) and, for a
    failure, its traceback. The ``orch.state`` tag, and a ``[state]`` suffix on the run's name for
    every state but complete, tell the states apart in the MLflow UI at a glance."""
    if error is not None:
        if isinstance(error, BaseException):
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            reason = f"{type(error).__name__}: {error}"
        else:
            text = reason = error
        text, reason = redact(text), redact(reason)
        if state == "failed":
            mlf.log_text(run_id, text, schema.TRACEBACK)
        mlf.set_tag(run_id, schema.RUN_ERROR if state == "failed" else schema.RUN_REASON, reason[:5000])
    mlf.set_tag(run_id, schema.STATE, state)
    name = mlf.get_run(run_id).info.run_name
    if name:  # a run ended before in another state (see outcomes.close_runs) loses that suffix
        base = name
        for other in schema.RUN_STATUS:
            base = base.removesuffix(f" [{other}]")
        renamed = base if state == "complete" else f"{base} [{state}]"
        if renamed != name:
            mlf.update_run(run_id, name=renamed)
    mlf.set_terminated(run_id, schema.RUN_STATUS[state])


def log_settings(mlf, run_id: str, spec) -> None:
    """A run's resolved settings as params and as ``config.yaml`` (passwords and credentials hidden)."""
    log_params(mlf, run_id, redact_settings(spec.flat_params()))
    mlf.log_text(run_id, yaml.safe_dump(redact_settings(spec.resolved()), sort_keys=False), schema.CONFIG)


def tag_fit(mlf, run_id: str, plugins: dict[str, dict[str, str]], device: str, seed: int, threads: int) -> None:
    """Tags naming each plugin of a fit with its distribution and version, the device, the seed and
    the torch threads."""
    tags = {}
    for section, p in plugins.items():
        tags[schema.plugin_tag(section)] = p["name"]
        tags[schema.distribution_tag(section)] = f"{p['distribution']}=={p['version']}"
    tags.update({schema.RUN_DEVICE: device, schema.SEED: str(seed), schema.THREADS: str(threads)})
    for k, v in tags.items():
        mlf.set_tag(run_id, k, v)


def copy_history(mlf, source_runs: list[str], target_run: str, before_epoch: int) -> int:
    """Log to ``target_run`` the metrics of the epochs before ``before_epoch``, each (metric, epoch)
    from the first of ``source_runs`` (the earlier tries, newest first) that has it."""
    from mlflow.entities import Metric

    taken: dict[tuple[str, int], Metric] = {}
    for run in source_runs:
        for key in mlf.get_run(run).data.metrics:
            for m in mlf.get_metric_history(run, key):
                if m.step < before_epoch:
                    taken.setdefault((key, m.step), Metric(key, m.value, m.timestamp, m.step))
    metrics = list(taken.values())
    for i in range(0, len(metrics), 1000):
        mlf.log_batch(target_run, metrics=metrics[i:i + 1000])
    return len(metrics)

"""A study's MLflow side: which store it logs to, and its one parent run (found, or created once),
with the study's settings and, as the study goes on, its counts and best trial.

The parent run is recorded with the study (:data:`orchestrator.schema.PARENT_RUN`), so that every
process of the study, on any machine, logs its trials under the same one.
"""

from __future__ import annotations

import math
import os
from typing import Any

import yaml

from orchestrator import names, schema
from orchestrator.errors import StoreError
from orchestrator.secrets import MASK, redact_settings, redact_url
from orchestrator.spec.study import Study
from orchestrator.storage.record import spec_text
from orchestrator.storage.urls import sqlite_path
from orchestrator.tracking.client import experiment_id, log_params, resolve_tracking_uri
from orchestrator.tracking.runs import start_run
from orchestrator.tracking.views import save_study_view


def study_tracking_uri(study: Study, recorded: str | None, given: str | None, create: bool) -> str:
    """The MLflow store: the one given (flag, the file when creating, ``$MLFLOW_TRACKING_URI``),
    else the one the study recorded, else the default SQLite store under ``mlruns/``."""
    explicit = given or (study.base.tracking_uri if create else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if explicit:
        return resolve_tracking_uri(explicit)
    if recorded and MASK in recorded:
        raise StoreError(f"study {study.name!r} logs to {recorded}, whose password is not stored: pass it with "
                         "--tracking-uri (or $MLFLOW_TRACKING_URI)")
    if recorded and sqlite_path(recorded) and not os.path.exists(sqlite_path(recorded)):
        raise StoreError(f"study {study.name!r} logs to {recorded}, a file of the machine it was created on: "
                         "pass --tracking-uri (an MLflow tracking server, for studies on several machines)")
    return resolve_tracking_uri(recorded)


def parent_run(mlf, study: Study, ostudy, storage_url: str, uri: str, attrs: dict[str, Any], create: bool) -> str:
    """The study's one parent run in ``mlf``'s store: the recorded one, else found by its tags (a study
    from an older orch), else created with the study settings (``create``), and recorded."""
    from mlflow.exceptions import MlflowException

    exp_id = experiment_id(mlf, study.name)
    if create:
        save_study_view(mlf, exp_id, study)
    run_id = attrs.get(schema.PARENT_RUN)
    if run_id:
        try:
            if mlf.get_run(run_id).info.experiment_id != exp_id:
                run_id = None
        except MlflowException as exc:  # only a run that is not there; an unreachable store is an error
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run_id = None
    if not run_id:  # a study started by an older orch, which did not record its parent run
        # the study's name is a name (orchestrator.names: no quote); the storage URL is compared here,
        # never put in a filter string, where a quote in it would end the literal
        found = [r for r in mlf.search_runs([exp_id], max_results=100, filter_string=(
            f"tags.`{schema.ROLE}` = 'study' and tags.`{schema.STUDY}` = '{names.check(study.name)}'"))
            if r.data.tags.get(schema.STORAGE) == redact_url(storage_url)]
        run_id = found[0].info.run_id if found else None
    if not run_id and not create:
        raise StoreError(f"study {study.name!r}: its MLflow parent run {attrs.get(schema.PARENT_RUN)} is not in "
                         f"{redact_url(mlf.tracking_uri)}; point --tracking-uri at the store it was created with "
                         f"({attrs.get(schema.TRACKING_URI) or 'unknown'})")
    if run_id:
        mlf.update_run(run_id, status="RUNNING")
    else:
        run_id = start_run(mlf, study.name, run_name=f"study-{study.name}",
                           tags={schema.ROLE: "study", schema.STUDY: study.name,
                                 schema.STORAGE: redact_url(storage_url)})
        s = study.section
        params = {"study.metric": s.metric, "study.direction": s.direction, "study.sampler": s.sampler.type,
                  "study.pruner": s.pruner.type, **{f"study.sampler.{k}": v for k, v in s.sampler.options.items()},
                  **{f"study.pruner.{k}": v for k, v in s.pruner.options.items()},
                  **{f"space.{k}": p.model_dump(exclude_none=True) for k, p in s.space.items()},
                  **{f"fixed.{k}": v for k, v in study.base.flat_params().items()}}
        log_params(mlf, run_id, redact_settings(params))
        shown_file = yaml.safe_dump(redact_settings(yaml.safe_load(spec_text(study))), sort_keys=False)
        mlf.log_text(run_id, shown_file, schema.STUDY_FILE)
    if attrs.get(schema.PARENT_RUN) != run_id:
        ostudy.set_user_attr(schema.PARENT_RUN, run_id)
    shown = redact_url(uri)
    if attrs.get(schema.TRACKING_URI) != shown:
        ostudy.set_user_attr(schema.TRACKING_URI, shown)
    return run_id


def end_parent(mlf, run_id: str, finished: bool) -> None:
    """Close the parent run: FINISHED once no trial is left to run, KILLED when the study was stopped
    (the next ``study run`` or ``study worker`` opens it again)."""
    mlf.set_terminated(run_id, "FINISHED" if finished else "KILLED")


def log_progress(mlf, parent_id: str, ostudy, counts: dict[str, int], metric: str, step: int) -> None:
    """The study so far on its parent run: trials by state, the best value, and the best trial's
    number, run and params as tags."""
    for state, n in counts.items():
        mlf.log_metric(parent_id, f"{schema.TRIALS_METRIC_PREFIX}{state}", n, step=step)
    try:
        best = ostudy.best_trial
    except ValueError:
        return
    if best.value is None or not math.isfinite(best.value):
        return
    mlf.log_metric(parent_id, f"{schema.BEST_METRIC_PREFIX}{metric}", best.value, step=step)
    mlf.set_tag(parent_id, schema.BEST_TRIAL, str(best.number))
    if best.user_attrs.get(schema.RUN_ID):
        mlf.set_tag(parent_id, schema.BEST_RUN, best.user_attrs[schema.RUN_ID])
    for k, v in best.params.items():
        mlf.set_tag(parent_id, f"{schema.BEST_PARAM_PREFIX}{k}", str(v))

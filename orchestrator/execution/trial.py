"""One trial, run to its end in Optuna and MLflow by the worker that claimed it.

The phases: open its MLflow run (:func:`_open_run`), draw its parameters and find where its
line left off (:func:`_prepare`), fit it (:func:`_fit`), then end it in one of the states of
:mod:`orchestrator.execution.outcomes` (:func:`_end`). A retried trial (``orch.retry_of``)
continues from the last checkpoint of its line, if the checkpoint store has one, with the
earlier epochs' metrics copied to its MLflow run and reported to Optuna again.

A trial whose lease was lost meanwhile (another process declared it lost:
:mod:`orchestrator.execution.lease`) stops at its next step and writes nothing more; a store
that is away is waited out (:mod:`orchestrator.outages`), and one away for longer than its
window interrupts the trial and stops the study.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import schema
from orchestrator.errors import ResourceFault, SpecError, resource_fault
from orchestrator.execution import lease, stopping
from orchestrator.execution.outcomes import conclude, interrupt
from orchestrator.outages import unavailable_in
from orchestrator.secrets import redact
from orchestrator.spec.space import suggest
from orchestrator.storage import optuna_api, owners
from orchestrator.tracking.runs import copy_history, start_run
from orchestrator.tracking.views import run_name


@dataclass
class _Run:
    """What the phases of one trial share."""

    run_id: str
    line: Any  # its line in the checkpoint store (orchestrator.training.stores)
    lineage: int
    retry_of: int | None
    params: dict[str, Any] | None = None
    spec: Any = None
    key: str = ""
    resume_at: int | None = None
    resume_from: Path | None = None  # the checkpoint it resumes from, on this machine
    pruning: Any = None  # its pruning callback, which may hold reports not written yet


def run_trial(job, ostudy, trial, mlf, slot, offset: int = 0) -> str:
    """Run one claimed trial to its end in Optuna and MLflow; returns the state it ended in
    (``offset``: its worker's sampler seed offset, tagged on its run)."""
    import optuna

    held = lease.current()
    run = _open_run(job, trial, mlf, slot, offset)
    try:
        _prepare(job, ostudy, trial, mlf, run)
        value = _fit(job, trial, mlf, slot, run)
        if held is not None:
            held.finishing()
        mlf.log_metric(run.run_id, schema.OBJECTIVE, value)
    except lease.TrialLost:  # its retry runs elsewhere: nothing more is written, its checkpoints are the retry's
        run.line.discard_own()
        return "lost"
    except optuna.TrialPruned as exc:
        if held is not None:
            held.finishing()
        state = conclude(ostudy, trial, mlf, run.run_id, "pruned", error=str(exc))
    except (Exception, KeyboardInterrupt, SystemExit) as exc:
        if held is not None:
            held.finishing()
        state = _end(ostudy, trial, mlf, run, exc)
    else:
        state = conclude(ostudy, trial, mlf, run.run_id, "complete", value=value)
    if state in ("complete", "pruned", "failed"):  # interrupted and lost ones resume from it
        run.line.remove()  # the best checkpoint is in MLflow; nothing is left to resume
    run.line.release()
    return state


def _open_run(job, trial, mlf, slot, offset: int) -> _Run:
    """The trial's MLflow run, under the study's parent run, tagged with its worker and line."""
    from orchestrator.training import stores

    tags = {schema.STUDY: job.study.name, schema.TRIAL: str(trial.number), schema.ROLE: "trial",
            schema.RUN_WORKER: owners.worker_id(), schema.SLOT: slot.device, schema.SAMPLER_OFFSET: str(offset)}
    retry_of = trial.user_attrs.get(schema.RETRY_OF)
    lineage = trial.user_attrs.get(schema.LINEAGE, trial.number)
    if retry_of is not None:
        tags[schema.RETRY_OF] = str(retry_of)
    run_id = start_run(mlf, job.study.name, run_name=f"trial-{trial.number}", parent_run_id=job.parent_run_id,
                       tags=tags)
    trial.set_user_attr(schema.RUN_ID, run_id)
    trial.set_user_attr(schema.DEVICE, slot.device)
    held = lease.current()
    line = stores.line_for(job.checkpoint_dir, job.study.name, lineage, mlf, job.parent_run_id, job.tracking_uri,
                           may_write=held.may_write if held is not None else (lambda: True))
    return _Run(run_id, line, lineage, retry_of)


def _prepare(job, ostudy, trial, mlf, run: _Run) -> None:
    """Draw the parameters, name the run after them, and find the epoch a retry resumes at."""
    from orchestrator.training import checkpoints

    run.params = suggest(trial, job.study.section, job.study.data)
    mlf.update_run(run.run_id, name=run_name(trial.number, run.params))
    run.spec = job.study.spec_for(run.params)
    run.key = checkpoints.fingerprint(optuna_api.study_id(ostudy), run.lineage, run.params)
    if run.retry_of is None:
        run.line.remove()  # a new line: nothing of another study's trial of this number
        return
    point = run.line.fetch(run.key)
    if point is not None:
        run.resume_from, run.resume_at, window = point
        mlf.set_tag(run.run_id, schema.RESUMED_AT_EPOCH, str(run.resume_at))
        if window is not None:
            mlf.set_tag(run.run_id, schema.RESUMED_AT_WINDOW, str(window))
        trial.set_user_attr(schema.RESUMED_AT_EPOCH, run.resume_at)  # for the live table's ETA
        _carry_over(ostudy, trial, mlf, run.run_id, run.resume_at)


def _fit(job, trial, mlf, slot, run: _Run) -> float:
    """Fit the trial on its slot's device; returns the value of the study's metric."""
    from orchestrator.contracts.module import NonFiniteLossError
    from orchestrator.training import callbacks
    from orchestrator.training.fit import tracked_fit

    section = job.study.section
    overrides = {"accelerator": "gpu", "devices": 1} if slot.gpu is not None else {"accelerator": "cpu"}
    mode = "min" if section.direction == "minimize" else "max"
    held = lease.current()
    run.pruning = callbacks.pruning(trial, section.metric)
    result = tracked_fit(run.spec, mlf, run.run_id,
                         callbacks=[run.pruning, callbacks.interruption()],
                         checkpoint=(section.metric, mode) if section.checkpoint else None,
                         ckpt_line=run.line, ckpt_key=run.key,
                         ckpt_every=(section.checkpoint_every.windows, section.checkpoint_every.seconds),
                         resume=run.resume_from,
                         may_write=held.may_write if held is not None else (lambda: True),
                         enable_progress_bar=False, **overrides)
    run.pruning.flush()  # the reports kept while the storage was away (waits for it)
    value = result.metrics.get(section.metric)
    if value is None:
        raise RuntimeError(f"the run did not log {section.metric!r}; it logged: "
                           f"{', '.join(sorted(result.metrics)) or 'nothing'}")
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{section.metric} is {value}")
    return value


def _end(ostudy, trial, mlf, run: _Run, exc: BaseException) -> str:
    """End a trial that raised ``exc``: interrupted (a stop signal; a store away for longer than its
    outage window, or a resource fault, which then stop the study with :class:`ResourceFault`) and
    retried, else failed with its reason."""
    # a stop signal (the flag, Lightning's SIGTERMException, a KeyboardInterrupt) interrupts the
    # trial: it is retried and uses no budget; a fault that retrying cannot fix (a full disk, a
    # read-only store, a store away for too long) interrupts it too, and stops the study
    fatal = resource_fault(exc)
    away = unavailable_in(exc)  # a store that did not answer in time, met outside its retries
    if stopping.requested() is not None or isinstance(exc, KeyboardInterrupt) or fatal or away:
        reason = (f"interrupted: {fatal}" if fatal else f"interrupted: a store does not answer ({away}); it is "
                  "retried with the same parameters" if away else
                  f"interrupted ({signal.Signals(stopping.requested() or signal.SIGINT).name}) while running; "
                  "it is retried with the same parameters, from its last checkpoint")
        attrs = {schema.ERROR: redact(reason)[:2000], schema.INTERRUPTED: True}
        if run.pruning is not None and run.pruning.pending and not fatal:
            try:  # its retry carries its reports over
                run.pruning.flush()
            except Exception:  # noqa: BLE001 - away, or lost: the retry reruns those epochs
                pass
        state = interrupt(ostudy, trial, mlf, run.run_id, reason, attrs)
        if fatal:
            raise ResourceFault(fatal) from exc
        return state
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise exc
    reason = exc.detail if isinstance(exc, SpecError) else f"{type(exc).__name__}: {exc}"
    return conclude(ostudy, trial, mlf, run.run_id, "failed", error=exc, attrs={schema.ERROR: redact(reason)[:2000]})


def _carry_over(ostudy, trial, mlf, run_id: str, resume_at: int) -> None:
    """Give a resumed trial the epochs it does not run again, from the earlier tries of its line
    (newest first, so that a try that died before copying its own history is made up for): their
    MLflow metrics and their reports to Optuna."""
    tries, number = [], trial.user_attrs.get(schema.RETRY_OF)
    while number is not None:
        earlier = optuna_api.by_number(ostudy, number)
        tries.append(earlier)
        number = earlier.user_attrs.get(schema.RETRY_OF)
    copy_history(mlf, [t.user_attrs[schema.RUN_ID] for t in tries if t.user_attrs.get(schema.RUN_ID)], run_id,
                 resume_at)
    reports: dict[int, float] = {}
    for t in tries:
        for step, value in t.intermediate_values.items():
            reports.setdefault(step, value)
    for step in sorted(s for s in reports if s < resume_at):
        trial.report(reports[step], step)

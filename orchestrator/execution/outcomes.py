"""A trial's final state: the one vocabulary every reader uses, and the one writer.

States (:data:`orchestrator.schema.STATES`): complete, pruned, failed, interrupted, lost,
running, waiting. In Optuna, interrupted and lost trials are FAIL with :data:`~orchestrator.schema.INTERRUPTED`
or :data:`~orchestrator.schema.LOST` set: they use no budget and are retried. In MLflow each has
its status and the ``orch.state`` tag.

A trial ends in one of two ways, both here, so that Optuna and MLflow cannot disagree:

- its worker ends it (:func:`conclude`): MLflow first, then Optuna, so that a worker that dies
  in between leaves a RUNNING trial, found lost in both; a trial another process declared lost
  meanwhile keeps that verdict;
- another process ends it for a worker that is gone or was stopped (:func:`end_for_worker`, under
  the claim lock), then closes its MLflow run (:func:`close_runs`, outside the lock).

Where one store cannot be written when a trial ends (away past its outage window, full), the
other still records the verdict (:func:`interrupt`); the next run puts them in agreement again
(:func:`run_verdict`, :func:`reconcile`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from orchestrator import schema
from orchestrator.errors import resource_fault
from orchestrator.outages import connection_problem, no_wait
from orchestrator.storage import optuna_api
from orchestrator.tracking.runs import end_run

#: the loss of this many tries of one line counts as a failure (no more retries)
MAX_LOSSES = 3
_OPTUNA_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
                  "WAITING": "waiting"}


def state_of(trial) -> str:
    """The trial's state in orch's vocabulary: ``interrupted`` and ``lost`` apart from ``failed``."""
    key = _OPTUNA_STATES[trial.state.name]
    if key == "failed" and trial.user_attrs.get(schema.INTERRUPTED):
        return "interrupted"
    if key == "failed" and trial.user_attrs.get(schema.LOST):
        return "lost"
    return key


def counts_of(trials) -> dict[str, int]:
    """Trials by :func:`state_of`, every state present."""
    out = dict.fromkeys(schema.STATES, 0)
    for t in trials:
        out[state_of(t)] += 1
    return out


def retryable(trial) -> bool:
    """A failed trial that uses no budget: interrupted by the user or lost with its worker."""
    return state_of(trial) in ("interrupted", "lost")


def conclude(ostudy, trial, mlf, run_id: str, state: str, *, value: float | None = None, error=None,
             attrs: dict | None = None) -> str:
    """End the trial this worker runs: its MLflow run with ``state``, then Optuna; returns the state
    it ended in (``"lost"`` if another process declared it lost meanwhile, as both stores then say)."""
    import optuna

    if not _taken_over(ostudy, trial, mlf, run_id):
        try:
            for key, v in (attrs or {}).items():
                trial.set_user_attr(key, v)
            end_run(mlf, run_id, state, error)
            if state == "complete":
                ostudy.tell(trial, value)
            else:
                ostudy.tell(trial, state=optuna.trial.TrialState.PRUNED if state == "pruned" else
                            optuna.trial.TrialState.FAIL)
            return state
        except Exception:  # finished by another process between the check and the tell?
            if not _taken_over(ostudy, trial, mlf, run_id):
                raise
    return "lost"


def _taken_over(ostudy, trial, mlf, run_id: str) -> bool:
    """Whether the trial was already finished by another process (declared lost); if so its MLflow
    run is closed as lost, as the trial is in Optuna (unless that process closed it already)."""
    if optuna_api.fresh(ostudy, trial).state.name == "RUNNING":
        return False
    _end_if_running(mlf, run_id, "lost", "lost: declared lost while it was still running (its heartbeat "
                    "stalled past the grace period); a retry replaces it")
    return True


def _end_if_running(mlf, run_id: str, state: str, reason) -> None:
    """End the run with ``state`` unless it has ended in that state already (its first end time
    stays); a run that ended in another state (its worker closed it before the storage could take
    the trial's end) is given the trial's."""
    run = mlf.get_run(run_id)
    if run.info.status == "RUNNING" or run.data.tags.get(schema.STATE) != state:
        end_run(mlf, run_id, state, reason)


def interrupt(ostudy, trial, mlf, run_id: str, reason: str, attrs: dict) -> str:
    """End the trial this worker runs as interrupted in both stores; where one of them cannot be
    written (away past its outage window, full, read-only), the other still takes the verdict, and
    the next run makes them agree (:func:`run_verdict`, :func:`reconcile`)."""
    import optuna

    try:
        return conclude(ostudy, trial, mlf, run_id, "interrupted", error=reason, attrs=attrs)
    except Exception as again:  # noqa: BLE001 - sorted below
        if not (resource_fault(again) or connection_problem(again)):
            raise
    with contextlib.suppress(Exception):
        _end_if_running(mlf, run_id, "interrupted", reason)
    with contextlib.suppress(Exception):
        for key, v in attrs.items():
            trial.set_user_attr(key, v)
        ostudy.tell(trial, state=optuna.trial.TrialState.FAIL)
    return "interrupted"


@dataclass
class Ended:
    """A trial ended in Optuna by :func:`end_for_worker`, whose MLflow run is still to be closed as
    ``state`` (``lost``, ``interrupted``, or ``failed`` for a loss on the last try)."""

    number: int
    run_id: str | None
    reason: str
    state: str
    retried: bool = True  # queued to run again (it has parameters to repeat)


def end_for_worker(ostudy, trials, reason, kind: str, verdict=None) -> list[Ended]:
    """End the running ``trials`` of workers that are gone (``kind="lost"``: retried unless their
    line was lost :data:`MAX_LOSSES` times) or stopped (``"interrupted"``: retried) as FAIL in
    Optuna, with ``reason(trial)``; close their MLflow runs with :func:`close_runs`.

    ``verdict(trial)``: the interruption a gone worker recorded in the trial's MLflow run when the
    storage could not take it (:func:`run_verdict`); such a trial ends interrupted, not lost."""
    ended = []
    for t in trials:
        why, state = reason(t), kind
        told = verdict(t) if verdict is not None and kind == "lost" else None
        if told:
            why, state = told, "interrupted"
        attr = schema.INTERRUPTED if state == "interrupted" else schema.LOST
        if state == "lost" and t.user_attrs.get(schema.LOSSES, 0) + 1 >= MAX_LOSSES:
            why += f"; its line was lost {MAX_LOSSES} times, so it counts as failed and is not retried"
            attr, state = None, "failed"
        # the reason goes first (a finished trial takes no attributes); should the trial finish in
        # between, the attributes stay on a finished trial, where only FAIL makes them count
        with contextlib.suppress(Exception):
            optuna_api.set_attr(ostudy, t, schema.ERROR, why)
            for flag in (schema.INTERRUPTED, schema.LOST):  # one verdict, whatever its worker had begun to write
                if flag == attr or t.user_attrs.get(flag):
                    optuna_api.set_attr(ostudy, t, flag, flag == attr)
        try:
            optuna_api.fail(ostudy, t)
        except Exception:  # noqa: BLE001 - finished meanwhile by its worker
            continue
        repeatable = bool(t.params or t.system_attrs.get("fixed_params") or t.system_attrs.get("grid_id") is not None)
        ended.append(Ended(t.number, t.user_attrs.get(schema.RUN_ID), why, state,
                           retried=state != "failed" and repeatable))
    return ended


def run_verdict(mlf):
    """``verdict(trial)`` for :func:`end_for_worker`: the reason of the interruption that the trial's
    worker recorded in its MLflow run before it went (``None``: none, or the store does not answer)."""
    def verdict(t) -> str | None:
        run_id = t.user_attrs.get(schema.RUN_ID)
        if not run_id or mlf is None:
            return None
        try:
            with no_wait():
                run = mlf.get_run(run_id)
        except Exception:  # noqa: BLE001 - not there, or away: the trial is lost
            return None
        if run.info.status == "KILLED" and run.data.tags.get(schema.STATE) == "interrupted":
            return run.data.tags.get(schema.RUN_REASON) or "interrupted"
        return None
    return verdict


def close_runs(mlf, ended: list[Ended]) -> None:
    """End the MLflow runs of trials ended by :func:`end_for_worker` (outside the claim lock: a slow
    tracking server must not hold up every worker's claims)."""
    for e in ended:
        if e.run_id:
            try:
                _end_if_running(mlf, e.run_id, e.state, e.reason)
            except Exception as exc:  # noqa: BLE001 - the next run reconciles what is left (reconcile)
                if connection_problem(exc):
                    return  # the tracking store is away: the others would wait for it too


def reconcile(ostudy, mlf, study_name: str) -> list[int]:
    """Close the trial runs left RUNNING in MLflow whose trial has ended in Optuna (the tracking
    store was away when it ended, or its worker died before it could close the run), each in its
    trial's state; returns those trials' numbers."""
    exp = mlf.get_experiment_by_name(study_name)
    if exp is None:
        return []
    runs = mlf.search_runs([exp.experiment_id], max_results=5000, filter_string=(
        f"attributes.status = 'RUNNING' and tags.`{schema.ROLE}` = 'trial'"))
    if not runs:
        return []
    trials = ostudy.get_trials(deepcopy=False)
    by_run = {t.user_attrs.get(schema.RUN_ID): t for t in trials if t.user_attrs.get(schema.RUN_ID)}
    by_number = {t.number: t for t in trials}
    closed = []
    for run in runs:
        t = by_run.get(run.info.run_id)
        if t is None:  # a run its trial never recorded: its worker died between the two
            number = run.data.tags.get(schema.TRIAL, "")
            t = by_number.get(int(number)) if number.isdigit() else None
            if t is None or t.state.name in ("RUNNING", "WAITING"):
                continue
            state, reason = "lost", "lost: its worker died before the trial recorded this run"
        elif t.state.name in ("RUNNING", "WAITING"):
            continue
        else:
            state = state_of(t)
            reason = None if state == "complete" else t.user_attrs.get(schema.ERROR) or state
        with contextlib.suppress(Exception):
            end_run(mlf, run.info.run_id, state, reason)
            closed.append(t.number)
    return closed

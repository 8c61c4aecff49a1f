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
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from orchestrator import schema
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
    run is closed as lost, as the trial is in Optuna."""
    if optuna_api.fresh(ostudy, trial).state.name == "RUNNING":
        return False
    end_run(mlf, run_id, "lost", "lost: declared lost while it was still running (its heartbeat "
            "stalled past the grace period); a retry replaces it")
    return True


@dataclass
class Ended:
    """A trial ended in Optuna by :func:`end_for_worker`, whose MLflow run is still to be closed as
    ``state`` (``lost``, ``interrupted``, or ``failed`` for a loss on the last try)."""

    number: int
    run_id: str | None
    reason: str
    state: str


def end_for_worker(ostudy, trials, reason, kind: str) -> list[Ended]:
    """End the running ``trials`` of workers that are gone (``kind="lost"``: retried unless their
    line was lost :data:`MAX_LOSSES` times) or stopped (``"interrupted"``: retried) as FAIL in
    Optuna, with ``reason(trial)``; close their MLflow runs with :func:`close_runs`."""
    ended = []
    for t in trials:
        why, state = reason(t), kind
        attr = schema.INTERRUPTED if kind == "interrupted" else schema.LOST
        if kind == "lost" and t.user_attrs.get(schema.LOSSES, 0) + 1 >= MAX_LOSSES:
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
        ended.append(Ended(t.number, t.user_attrs.get(schema.RUN_ID), why, state))
    return ended


def close_runs(mlf, ended: list[Ended]) -> None:
    """End the MLflow runs of trials ended by :func:`end_for_worker` (outside the claim lock: a slow
    tracking server must not hold up every worker's claims)."""
    for e in ended:
        if e.run_id:
            with contextlib.suppress(Exception):
                end_run(mlf, e.run_id, e.state, e.reason)

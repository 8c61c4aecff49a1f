"""Claiming trials against a shared budget, and finding the trials whose worker is gone.

Every process of a study (``study run`` workers and ``study worker`` workers, on any machine)
claims its next trial under the study's lock (:mod:`orchestrator.storage.locks`): count the trials that
use budget, then ask Optuna for one, then record the claimant as its owner. So the budget is
exact whatever the number of processes.

A trial whose worker is gone is *lost*: its worker process died (the supervisor saw it exit, or
its pid no longer exists on this host) or, with an RDB storage, its heartbeat went silent for
longer than the grace period (a killed ``study worker``, a machine that disappeared). A lost
trial ends FAILED in Optuna (KILLED in MLflow), uses no budget, and is retried with the same parameters
by the next worker to claim (until its line has been lost
:data:`~orchestrator.execution.outcomes.MAX_LOSSES` times: then it counts as an ordinary failure).
A trial the user interrupted (Ctrl-C) is retried the same way.

How such trials end is :mod:`orchestrator.execution.outcomes`; this module decides which.
"""

from __future__ import annotations

import contextlib
import socket
import time

from orchestrator import schema
from orchestrator.execution.outcomes import Ended, close_runs, end_for_worker, retryable, run_verdict
from orchestrator.outages import no_wait
from orchestrator.storage import optuna_api, owners, record
from orchestrator.storage.locks import if_free, store_lock


def claim_lock(storage_url: str, study_name: str):
    """The lock that makes "count the trials, then ask for one" atomic for one study."""
    return store_lock(storage_url, f"claim:{study_name}")


def counted(trials) -> int:
    """Trials that use up budget: all but those waiting to be picked up and the retryable ones."""
    return sum(1 for t in trials if t.state.name != "WAITING" and not retryable(t))


def requeue(ostudy, trials=None) -> list[int]:
    """Queue one retry, with the same parameters, of each retryable trial not retried yet.

    Call it under the claim lock (``trials``: the study's trials, if just read). The retry is an
    ordinary WAITING trial: the next worker to ask for a trial gets it, and it uses the budget
    like any other.
    """
    from optuna.trial import TrialState, create_trial

    trials = ostudy.get_trials(deepcopy=False) if trials is None else trials
    retried = {t.user_attrs.get(schema.RETRY_OF) for t in trials}
    queued = []
    for t in trials:
        if not retryable(t) or t.number in retried:
            continue
        attrs = {schema.RETRY_OF: t.number, schema.ATTEMPT: t.user_attrs.get(schema.ATTEMPT, 1) + 1,
                 schema.LINEAGE: t.user_attrs.get(schema.LINEAGE, t.number),
                 schema.LOSSES: t.user_attrs.get(schema.LOSSES, 0) + (1 if t.user_attrs.get(schema.LOST) else 0)}
        grid = {k: t.system_attrs[k] for k in ("grid_id", "search_space") if k in t.system_attrs}
        # the params it had, else those it was queued with (a retry lost before it drew them)
        params = {**(t.system_attrs.get("fixed_params") or {}), **t.params}
        if grid:  # a grid point (its params may be partial if the stop came mid-sampling): same grid id
            ostudy.add_trial(create_trial(state=TrialState.WAITING, system_attrs=grid, user_attrs=attrs))
        elif params:  # any it had not sampled yet are sampled afresh
            ostudy.enqueue_trial(params, user_attrs=attrs)
        else:  # lost before sampling anything: there is nothing to repeat, a fresh trial replaces it
            continue
        queued.append(t.number)
    return queued


def reap(ostudy, trials=None, verdict=None, stale: bool = True) -> tuple[list[Ended], list[int], list]:
    """Fail the lost trials (stale heartbeats, dead workers of this machine) and queue their retries.

    Call it under the claim lock (``trials``: the study's trials, if just read), and close the
    returned trials' MLflow runs (:func:`close_runs`) after releasing it. Returns the trials found
    lost, the numbers of those queued again, and the study's trials after that. ``verdict``: see
    :func:`~orchestrator.execution.outcomes.end_for_worker`. ``stale=False``: stale heartbeats are
    not reaped (the storage was away within the grace period: every heartbeat is stale for that).
    """
    trials = ostudy.get_trials(deepcopy=False) if trials is None else trials
    lost = (fail_stale(ostudy, verdict) if stale else []) + fail_orphans(
        ostudy, running=[t for t in trials if t.state.name == "RUNNING"], verdict=verdict)
    if lost:
        trials = ostudy.get_trials(deepcopy=False)
    retried = requeue(ostudy, trials)
    if retried:
        trials = ostudy.get_trials(deepcopy=False)
    return lost, retried, trials


def claim(ostudy, lock, deadline: float | None, mlf, poll: float = 2.0, stop=lambda: None, outage=None):
    """The next trial, or ``None`` when the budget is used up, the deadline has passed or ``stop()``.

    The budget is the study's (:func:`orchestrator.storage.record.budget`), read under the lock, so a
    ``study run --trials N`` that raises it lets every worker carry on. While the budget is
    taken up only because trials are still running elsewhere, this waits: one of them may yet be
    lost and need a retry. ``outage``: the storage's :class:`~orchestrator.outages.Outage`; while
    the storage is away the whole locked step is tried again (the lock is the server's, and a
    restart releases it), up to its window.
    """
    verdict, grace = run_verdict(mlf), optuna_api.heartbeat_grace(ostudy)
    while (deadline is None or time.time() < deadline) and not stop():
        if outage is None:
            trial, lost, trials = _claim_once(ostudy, lock, stop, verdict)
        else:  # heartbeats are given the grace period to resume after an outage before any counts as stale
            stale = grace is None or outage.quiet_for(grace)
            trial, lost, trials = outage.call(_claim_once, ostudy, lock, stop, verdict, waits=False, stale=stale)
        close_runs(mlf, lost)
        if trial is not None:
            return trial
        if not any(t.state.name == "RUNNING" for t in trials):
            return None
        for _ in range(max(1, int(poll / 0.1))):
            if stop():
                return None
            time.sleep(0.1)
    return None


def _claim_once(ostudy, lock, stop, verdict, waits: bool = True, stale: bool = True):
    """One locked step of :func:`claim`: reap, count, ask, own (``waits=False``: no call waits for a
    storage that is away, so that the step is retried whole, under a lock taken again)."""
    with contextlib.nullcontext() if waits else no_wait(), lock:
        trial = None
        lost, _, trials = reap(ostudy, verdict=verdict, stale=stale)
        budget = record.budget(ostudy)
        if (budget is None or counted(trials) < budget) and not stop():
            trial = ostudy.ask()
            trial.set_user_attr(schema.WORKER, owners.worker_id())
            if optuna_api.heartbeat_enabled(ostudy):  # alive from the start
                optuna_api.record_heartbeat(ostudy, trial)
    return trial, lost, trials


def reap_stale(ostudy, lock, mlf) -> list[Ended]:
    """Reap the study's lost trials now, under ``lock`` (the claim lock, a separate one) if it is
    free (if not, a claim is under way, and reaps them), and close their runs: what a worker's
    heartbeat thread does while every worker is busy. It never waits for the lock: a holder cut off
    from the server must not stall the heartbeats."""
    with if_free(lock) as held:
        if not held:
            return []
        lost, _, _ = reap(ostudy, verdict=run_verdict(mlf))
    close_runs(mlf, lost)
    return lost


def fail_stale(ostudy, verdict=None) -> list[Ended]:
    """Mark lost the running trials whose heartbeat is older than the storage's grace period."""
    stale, grace = optuna_api.stale_trial_ids(ostudy)
    if not stale:
        return []
    trials = [t for t in ostudy.get_trials(deepcopy=False) if optuna_api.trial_id(t) in stale]
    return end_for_worker(ostudy, trials, lambda t: f"lost: worker {t.user_attrs.get(schema.WORKER, '?')} sent "
                       f"no heartbeat for over {grace} s (killed, stopped, cut off, or its machine is gone)", "lost",
                          verdict)


def fail_orphans(ostudy, dead: set[str] | None = None, interrupted: bool = False, running=None,
                 verdict=None) -> list[Ended]:
    """Mark lost (or ``interrupted``) the running trials whose worker is gone.

    ``dead``: the ids (:func:`~orchestrator.storage.owners.worker_id`) of workers known to have died.
    ``None``: every worker
    of this machine whose process no longer exists (what a killed process left behind); on a
    storage without heartbeats (a journal file, one machine's), every worker of an earlier boot
    of this host (a reboot, a restarted container); and every trial with no owner at all (its
    worker died while claiming it: call this under the claim lock, so that no live worker is in
    the middle of a claim; such a trial never trained, and ends interrupted, not lost). ``running``:
    the running trials, if just read.
    """
    import optuna

    here, host = owners.machine(), socket.gethostname()
    one_machine = not optuna_api.heartbeat_enabled(ostudy)
    orphans = []
    if running is None:
        running = ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in running:
        owner = t.user_attrs.get(schema.WORKER, "")
        owner_machine, pid = owners.split(owner)
        if dead is not None:
            gone = owner in dead
        elif not owner:
            gone = True
        elif owner_machine in (here, host):  # this machine (host alone: an id from an older orch)
            gone = not pid.isdigit() or not owners.pid_alive(int(pid))
        else:  # another machine, or this host before a reboot: only a journal cannot tell by heartbeats
            gone = one_machine and owner_machine.split("~")[0] == host
        if gone:
            orphans.append(t)
    if interrupted:
        return end_for_worker(ostudy, orphans, lambda t: "interrupted while running (its worker was stopped); it "
                           "is retried with the same parameters", "interrupted")
    # a trial with no owner never trained (its worker stopped, or lost the storage, while claiming
    # it): interrupted, which costs its line none of its MAX_LOSSES
    claiming = [t for t in orphans if not t.user_attrs.get(schema.WORKER)]
    ended = end_for_worker(ostudy, claiming, lambda t: "interrupted: its worker stopped while claiming it",
                           "interrupted") + end_for_worker(
        ostudy, [t for t in orphans if t.user_attrs.get(schema.WORKER)],
        lambda t: f"lost: worker {t.user_attrs[schema.WORKER]} died while running this trial", "lost", verdict)
    return sorted(ended, key=lambda e: e.number)

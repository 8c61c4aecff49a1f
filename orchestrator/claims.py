"""Claiming trials against a shared budget, and finding the trials whose worker is gone.

Every process of a study (``study run`` workers and ``study worker`` workers, on any machine)
claims its next trial under the study's lock (:mod:`orchestrator.locks`): count the trials that
use budget, then ask Optuna for one, then record the claimant as its owner. So the budget is
exact whatever the number of processes.

A trial whose worker is gone is *lost*: its worker process died (the supervisor saw it exit, or
its pid no longer exists on this host) or, with an RDB storage, its heartbeat went silent for
longer than the grace period (a killed ``study worker``, a machine that disappeared). A lost
trial ends FAILED in Optuna (KILLED in MLflow), uses no budget, and is retried with the same parameters
by the next worker to claim (until its line has been lost :data:`MAX_LOSSES` times: then it counts as
an ordinary failure). A trial the user interrupted (Ctrl-C) is retried the same way.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

from orchestrator.locks import store_lock

#: a trial's user attributes that tie it to its worker and its MLflow run
WORKER_ATTR = "orch.worker"
RUN_ATTR = "orch.mlflow_run_id"
ERROR_ATTR = "orch.error"
#: set on a failed trial that uses no budget and is retried: stopped by the user (Ctrl-C) ...
INTERRUPTED_ATTR = "orch.interrupted"
#: ... or lost with its worker
LOST_ATTR = "orch.lost"
#: on a retry, the number of the trial it repeats, which try it is (the first is 1), and the first
#: trial of its line (whose checkpoint folder it continues)
RETRY_ATTR = "orch.retry_of"
ATTEMPT_ATTR = "orch.attempt"
LINEAGE_ATTR = "orch.lineage"
#: on a retry, how many tries of its line were lost before it (interruptions do not count)
LOSSES_ATTR = "orch.losses"
#: the loss of this many tries of one line counts as a failure (no more retries)
MAX_LOSSES = 3


def claim_lock(storage_url: str, study_name: str):
    """The lock that makes "count the trials, then ask for one" atomic for one study."""
    return store_lock(storage_url, f"claim:{study_name}")


def worker_id(pid: int | None = None) -> str:
    """``MACHINE:PID`` of a worker process of this machine (see :func:`machine`)."""
    return f"{machine()}:{pid or os.getpid()}"


@functools.lru_cache(maxsize=1)
def machine() -> str:
    """This machine as worker ids name it: the host name, plus a tag of the kernel's boot and the pid
    namespace, so that two containers that share a host name are not taken for one machine (whose
    dead pids would make the other's trials look abandoned)."""
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        with contextlib.suppress(OSError):
            parts.append(open(path).read().strip() if path.endswith("boot_id") else str(os.stat(path).st_ino))
    tag = hashlib.sha1("/".join(parts).encode()).hexdigest()[:6] if parts else "-"
    return f"{socket.gethostname()}~{tag}"


def retryable(trial) -> bool:
    """A failed trial that uses no budget: interrupted by the user or lost with its worker."""
    return trial.state.name == "FAIL" and bool(trial.user_attrs.get(INTERRUPTED_ATTR)
                                               or trial.user_attrs.get(LOST_ATTR))


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
    retried = {t.user_attrs.get(RETRY_ATTR) for t in trials}
    queued = []
    for t in trials:
        if not retryable(t) or t.number in retried:
            continue
        attrs = {RETRY_ATTR: t.number, ATTEMPT_ATTR: t.user_attrs.get(ATTEMPT_ATTR, 1) + 1,
                 LINEAGE_ATTR: t.user_attrs.get(LINEAGE_ATTR, t.number),
                 LOSSES_ATTR: t.user_attrs.get(LOSSES_ATTR, 0) + (1 if t.user_attrs.get(LOST_ATTR) else 0)}
        grid = {k: t.system_attrs[k] for k in ("grid_id", "search_space") if k in t.system_attrs}
        if grid:  # a grid point (its params may be partial if the stop came mid-sampling): same grid id
            ostudy.add_trial(create_trial(state=TrialState.WAITING, system_attrs=grid, user_attrs=attrs))
        elif t.params:  # the params it had; any it had not sampled yet are sampled afresh
            ostudy.enqueue_trial(t.params, user_attrs=attrs)
        else:  # lost before sampling anything: there is nothing to repeat, a fresh trial replaces it
            continue
        queued.append(t.number)
    return queued


def reap(ostudy, trials=None) -> tuple[list[Ended], list[int], list]:
    """Fail the lost trials (stale heartbeats, dead workers of this machine) and queue their retries.

    Call it under the claim lock (``trials``: the study's trials, if just read), and close the
    returned trials' MLflow runs (:func:`close_runs`) after releasing it. Returns the trials found
    lost, the numbers of those queued again, and the study's trials after that.
    """
    trials = ostudy.get_trials(deepcopy=False) if trials is None else trials
    lost = fail_stale(ostudy) + fail_orphans(ostudy, running=[t for t in trials if t.state.name == "RUNNING"])
    if lost:
        trials = ostudy.get_trials(deepcopy=False)
    retried = requeue(ostudy, trials)
    if retried:
        trials = ostudy.get_trials(deepcopy=False)
    return lost, retried, trials


def claim(ostudy, lock, deadline: float | None, mlf, poll: float = 2.0, stop=lambda: None):
    """The next trial, or ``None`` when the budget is used up, the deadline has passed or ``stop()``.

    The budget is the study's (:func:`orchestrator.record.budget`), read under the lock, so a
    ``study run --trials N`` that raises it lets every worker carry on. While the budget is
    taken up only because trials are still running elsewhere, this waits: one of them may yet be
    lost and need a retry.
    """
    from optuna.storages._heartbeat import is_heartbeat_enabled

    from orchestrator import record

    storage = ostudy._storage
    while (deadline is None or time.time() < deadline) and not stop():
        trial = None
        with lock:
            lost, _, trials = reap(ostudy)
            budget = record.budget(ostudy)
            if (budget is None or counted(trials) < budget) and not stop():
                trial = ostudy.ask()
                if is_heartbeat_enabled(storage):  # alive from the start, before it has an owner to outlive
                    storage.record_heartbeat(trial._trial_id)
                trial.set_user_attr(WORKER_ATTR, worker_id())
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


class Heartbeat:
    """Records a running trial's heartbeat every interval (RDB storages; nothing on a journal).

    Unlike Optuna's own thread, a failed write (a database restart, a network blip) is logged and
    retried at the next beat instead of ending the heartbeats of a trial that is still training.
    """

    def __init__(self, ostudy, trial):
        from optuna.storages._heartbeat import is_heartbeat_enabled

        self._storage = ostudy._storage
        self._trial_id = trial._trial_id
        self._enabled = is_heartbeat_enabled(self._storage)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="orch-heartbeat", daemon=True)

    def _beat(self) -> None:
        import logging

        from orchestrator import stopping

        interval = self._storage.get_heartbeat_interval()
        failing = False
        while not self._stop.wait(interval):
            try:
                if self._storage.get_trial(self._trial_id).state.name != "RUNNING":
                    # declared lost by another process (its heartbeats stalled): a retry runs it now,
                    # so this worker stops at the next step instead of training it twice
                    stopping.request(signal.SIGTERM)
                    return
                self._storage.record_heartbeat(self._trial_id)
                failing = False
            except Exception as exc:  # noqa: BLE001 - retried at the next beat
                if not failing:
                    from orchestrator.secrets import redact

                    logging.getLogger("orch").warning("heartbeat of trial id %s failed, retrying: %s", self._trial_id,
                                                      redact(f"{type(exc).__name__}: {exc}"))
                failing = True

    def __enter__(self):
        if self._enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._enabled:
            self._stop.set()
            self._thread.join()


@dataclass
class Ended:
    """A trial that orch failed in Optuna, whose MLflow run is still to be closed as ``state``
    (``lost``, ``interrupted``, or ``failed`` for a loss on the last try)."""

    number: int
    run_id: str | None
    reason: str
    state: str


def fail_stale(ostudy) -> list[Ended]:
    """Mark lost the running trials whose heartbeat is older than the storage's grace period."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    storage = ostudy._storage
    if not (isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)):
        return []
    stale = set(storage._get_stale_trial_ids(ostudy._study_id))
    if not stale:
        return []
    trials = [t for t in ostudy.get_trials(deepcopy=False) if t._trial_id in stale]
    grace = getattr(storage, "_backend", storage).grace_period  # RDBStorage, under Optuna's cache
    return fail_trials(ostudy, trials, lambda t: f"lost: worker {t.user_attrs.get(WORKER_ATTR, '?')} sent "
                       f"no heartbeat for over {grace} s (killed, or its machine is gone)", "lost")


def fail_orphans(ostudy, dead: set[str] | None = None, interrupted: bool = False, running=None) -> list[Ended]:
    """Mark lost (or ``interrupted``) the running trials whose worker is gone.

    ``dead``: the ids (:func:`worker_id`) of workers known to have died. ``None``: every worker
    of this machine whose process no longer exists (what a killed process left behind); on a
    storage without heartbeats (a journal file, one machine's), every worker of an earlier boot
    of this host (a reboot, a restarted container); and every trial with no owner at all (its
    worker died while claiming it: call this under the claim lock, so that no live worker is in
    the middle of a claim). ``running``: the running trials, if just read.
    """
    import optuna
    from optuna.storages._heartbeat import is_heartbeat_enabled

    here, host = machine(), socket.gethostname()
    one_machine = not is_heartbeat_enabled(ostudy._storage)
    orphans = []
    if running is None:
        running = ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in running:
        owner = t.user_attrs.get(WORKER_ATTR, "")
        owner_machine, _, pid = owner.rpartition(":")
        if dead is not None:
            gone = owner in dead
        elif not owner:
            gone = True
        elif owner_machine in (here, host):  # this machine (host alone: an id from an older orch)
            gone = not pid.isdigit() or not _pid_alive(int(pid))
        else:  # another machine, or this host before a reboot: only a journal cannot tell by heartbeats
            gone = one_machine and owner_machine.split("~")[0] == host
        if gone:
            orphans.append(t)
    if interrupted:
        return fail_trials(ostudy, orphans, lambda t: "interrupted while running (its worker was stopped); it "
                           "is retried with the same parameters", "interrupted")
    return fail_trials(ostudy, orphans, lambda t: f"lost: worker {t.user_attrs[WORKER_ATTR]} died while "
                       "running this trial" if t.user_attrs.get(WORKER_ATTR) else
                       "lost: its worker died while claiming it", "lost")


def fail_trials(ostudy, trials, reason, kind: str) -> list[Ended]:
    """End ``trials`` FAILED in Optuna with ``reason(trial)``; close their MLflow runs with
    :func:`close_runs`.

    ``kind``: ``"lost"`` (retried, unless its line was lost :data:`MAX_LOSSES` times) or
    ``"interrupted"`` (retried); either uses no budget.
    """
    import optuna

    ended = []
    for t in trials:
        why, state = reason(t), kind
        attr = INTERRUPTED_ATTR if kind == "interrupted" else LOST_ATTR
        if kind == "lost" and t.user_attrs.get(LOSSES_ATTR, 0) + 1 >= MAX_LOSSES:
            why += f"; its line was lost {MAX_LOSSES} times, so it counts as failed and is not retried"
            attr, state = None, "failed"
        # the reason goes first (a finished trial takes no attributes); should the trial finish in
        # between, the attributes stay on a finished trial, where only FAIL makes them count
        with contextlib.suppress(Exception):
            ostudy._storage.set_trial_user_attr(t._trial_id, ERROR_ATTR, why)
            for flag in (INTERRUPTED_ATTR, LOST_ATTR):  # one verdict, whatever its worker had begun to write
                if flag == attr or t.user_attrs.get(flag):
                    ostudy._storage.set_trial_user_attr(t._trial_id, flag, flag == attr)
        try:
            ostudy._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
        except Exception:  # noqa: BLE001 - finished meanwhile by its worker
            continue
        ended.append(Ended(t.number, t.user_attrs.get(RUN_ATTR), why, state))
    return ended


def close_runs(mlf, ended: list[Ended]) -> None:
    """End the MLflow runs of trials failed by :func:`fail_trials` (outside the claim lock: a slow
    tracking server must not hold up every worker's claims)."""
    from orchestrator import runner

    for e in ended:
        if e.run_id:
            with contextlib.suppress(Exception):
                runner.end_run(mlf, e.run_id, e.state, e.reason)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

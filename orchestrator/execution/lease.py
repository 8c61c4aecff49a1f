"""A worker's lease on the trial it runs: its heartbeat, and how it learns that it lost the trial.

RDB storages record heartbeats (``study.heartbeat``); a trial silent for longer than the grace
period is *lost*: any process of the study ends it and queues its retry
(:func:`orchestrator.execution.claims.reap`). While a worker runs a trial, its :class:`Lease`
thread, every interval:

- checks that the trial is still running in the storage: one that another process declared lost
  (this worker was cut off from the network, stopped, or its machine slept past the grace
  period) makes the lease *lost*; the worker stops that trial at its next step, writes nothing
  more into its run (:class:`TrialLost`) and goes back to claiming, since its retry runs elsewhere;
- records the trial's heartbeat;
- reaps the study's other trials whose heartbeat is stale, so that a lost trial is found within
  one interval of the grace period even while every worker is busy; not while the storage was
  away within the last grace period, when every heartbeat is stale for the outage's sake.

A storage that does not answer is waited out (:mod:`orchestrator.outages`): the beats resume when
it answers. :meth:`Lease.finishing` is called before the worker ends the trial itself: from then
on the thread only beats, so a trial it finds finished is never mistaken for a lost one.
A journal file records no heartbeats: there the lease only carries the trial.
"""

from __future__ import annotations

import sys
import threading
import time

from orchestrator.outages import Unavailable, no_wait
from orchestrator.secrets import redact
from orchestrator.storage import optuna_api

_current: Lease | None = None


class TrialLost(Exception):
    """Raised in a worker whose trial was declared lost by another process meanwhile."""


def current() -> Lease | None:
    """The lease of the trial this worker is running, if any."""
    return _current


class Lease:
    """The heartbeat of ``trial`` (in a thread, while in its ``with`` block); ``reap()``, if given,
    reaps the study's stale trials; ``outage``: the storage's :class:`~orchestrator.outages.Outage`."""

    def __init__(self, ostudy, trial, *, reap=None, outage=None):
        self._ostudy, self._trial, self._reap, self._outage = ostudy, trial, reap, outage
        self.number = trial.number
        self.enabled = optuna_api.heartbeat_enabled(ostudy)
        self.interval = optuna_api.heartbeat_interval(ostudy) if self.enabled else None
        self.grace = optuna_api.heartbeat_grace(ostudy) if self.enabled else None
        self._lost = threading.Event()
        self._finishing = False
        self._confirmed = time.monotonic()  # the last time the storage said the trial is still ours
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="orch-heartbeat", daemon=True)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def finishing(self) -> None:
        """The worker ends the trial now: the thread keeps beating but no longer checks its state."""
        self._finishing = True

    def may_write(self) -> bool:
        """Whether the trial is still this worker's (checked with the storage, without waiting, when
        the heartbeats have been silent for half the grace period: a worker that was stopped or cut
        off learns it here before it writes)."""
        if self.lost:
            return False
        if not self.enabled or self._finishing or time.monotonic() - self._confirmed < self.grace / 2:
            return True
        try:
            with no_wait():
                state = optuna_api.fresh(self._ostudy, self._trial).state.name
        except Unavailable:
            return True  # the storage is away: no other process can declare the trial lost either
        if state != "RUNNING" and not self._finishing:
            self._declare_lost()
            return False
        self._confirmed = time.monotonic()
        return True

    def _declare_lost(self) -> None:
        if not self._lost.is_set():
            self._lost.set()
            print(f"orch worker: trial {self._trial.number} was declared lost by another process (its heartbeat "
                  f"was silent for longer than the grace period of {self.grace} s: this worker was stopped or cut "
                  "off); it stops the trial now and writes nothing more into it; its retry runs elsewhere",
                  file=sys.stderr, flush=True)

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                with no_wait():
                    if not self._finishing:
                        state = optuna_api.fresh(self._ostudy, self._trial).state.name
                        if state != "RUNNING" and not self._finishing:  # read again: it may have just begun to end it
                            self._declare_lost()
                            return
                    optuna_api.record_heartbeat(self._ostudy, self._trial)
                    self._confirmed = time.monotonic()
                    failing = False
                    if self._reap is not None and not self._finishing and self._stale_others() and (
                            self._outage is None or self._outage.quiet_for(self.grace)):
                        self._reap()
            except Unavailable:
                continue  # the storage's outage says so, once; the next beat tries again
            except Exception as exc:  # noqa: BLE001 - retried at the next beat
                if not failing:
                    print(f"orch worker: the heartbeat of trial {self._trial.number} failed, retrying: "
                          f"{redact(f'{type(exc).__name__}: {exc}')}", file=sys.stderr, flush=True)
                failing = True

    def _stale_others(self) -> bool:
        stale, _ = optuna_api.stale_trial_ids(self._ostudy)
        return bool(stale - {optuna_api.trial_id(self._trial)})

    def __enter__(self):
        global _current
        _current = self
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        global _current
        _current = None
        if self.enabled:
            self._stop.set()
            self._thread.join(timeout=60)  # a call stuck on a server that vanished: the thread is a daemon

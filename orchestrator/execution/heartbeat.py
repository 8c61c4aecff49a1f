"""A running trial's heartbeat: how the workers of other machines know it is still alive.

RDB storages record heartbeats (``study.heartbeat``); a trial silent for longer than the grace
period is found lost by any process of the study (:func:`orchestrator.execution.claims.fail_stale`)
and retried. A journal file records none: nothing runs then.
"""

from __future__ import annotations

import logging
import signal
import threading

from orchestrator.execution import stopping
from orchestrator.secrets import redact
from orchestrator.storage import optuna_api


class TrialHeartbeat:
    """Records a running trial's heartbeat every interval, in a thread, while in its ``with`` block.

    Unlike Optuna's own thread, a failed write (a database restart, a network blip) is logged and
    retried at the next beat instead of ending the heartbeats of a trial that is still training.
    A trial that another process declared lost meanwhile stops this worker at its next step
    (a retry runs it now: it must not be trained twice).
    """

    def __init__(self, ostudy, trial):
        self._ostudy = ostudy
        self._trial = trial
        self._enabled = optuna_api.heartbeat_enabled(ostudy)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="orch-heartbeat", daemon=True)

    def _beat(self) -> None:
        interval = optuna_api.heartbeat_interval(self._ostudy)
        failing = False
        while not self._stop.wait(interval):
            try:
                if optuna_api.fresh(self._ostudy, self._trial).state.name != "RUNNING":
                    stopping.request(signal.SIGTERM)
                    return
                optuna_api.record_heartbeat(self._ostudy, self._trial)
                failing = False
            except Exception as exc:  # noqa: BLE001 - retried at the next beat
                if not failing:
                    logging.getLogger("orch").warning("heartbeat of trial %s failed, retrying: %s", self._trial.number,
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

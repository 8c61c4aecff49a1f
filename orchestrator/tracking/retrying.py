"""An MLflow client whose every call waits out an outage of the tracking store (:mod:`orchestrator.outages`).

A worker's MLflow calls (create a run, log a batch, tag, end it) go through :class:`RetryingClient`
and so through the process's :class:`~orchestrator.outages.Outage` of the tracking store: a
tracking server that is restarted or away for minutes is waited for, up to the window. MLflow's
own HTTP retries are shortened in worker processes (:func:`short_http_retries`, unless the user
set them), so that the window, not MLflow's several minutes of retries, decides how long a call waits.
"""

from __future__ import annotations

import os

from orchestrator.outages import Outage

#: MLflow's HTTP settings in orch's processes, unless set: seconds of retries (MLflow's own
#: defaults, 7 retries from 2 s doubling, take about 4 minutes) and a minute, not two, for an
#: answer, so that orch's window decides how long a call waits
_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
         "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def short_http_retries() -> None:
    for key, value in _HTTP.items():
        os.environ.setdefault(key, value)


class RetryingClient:
    """An :class:`mlflow.MlflowClient` with every public method called through ``outage``."""

    def __init__(self, mlf, outage: Outage):
        self._mlf, self.outage = mlf, outage

    def __getattr__(self, name):
        attr = getattr(self._mlf, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def method(*args, **kwargs):
            return self.outage.call(attr, *args, **kwargs)
        return method

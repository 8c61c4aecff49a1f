"""An Optuna storage whose every call waits out an outage of the database (:mod:`orchestrator.outages`).

:func:`retrying` wraps the storage a worker (or a coordinator) opens: each call of Optuna's storage
API goes through the process's :class:`~orchestrator.outages.Outage` of that storage, so a
database restart or a network blip is waited for instead of failing the trial that met it. The
wrapper is an Optuna storage itself (a heartbeat storage when the wrapped one records
heartbeats), so a ``Study`` works on it unchanged.
"""

from __future__ import annotations

from orchestrator.outages import Outage
from orchestrator.storage import optuna_api

_classes: dict[tuple, type] = {}


def retrying(storage, outage: Outage):
    """``storage`` (an Optuna storage, as ``optuna.storages.get_storage`` returns it) with every call
    made through ``outage``."""
    bases, private = optuna_api.storage_bases(storage)
    if bases not in _classes:
        _classes[bases] = _make_class(bases, private)
    return _classes[bases](storage, outage)


def _make_class(bases: tuple[type, ...], private: set[str]) -> type:
    def __init__(self, inner, outage):
        self._inner, self._outage = inner, outage

    def __getattr__(self, name):  # attributes and private helpers of the wrapped storage
        if name in ("_inner", "_outage"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def forward(name):
        def method(self, *args, **kwargs):
            return self._outage.call(getattr(self._inner, name), *args, **kwargs)
        method.__name__ = name
        return method

    def set_trial_state_values(self, trial_id, state, values=None):
        """Ending a trial, retried after a connection error: the first try may have been committed
        before the connection broke, and then the retry finds the trial finished in that state.
        (Optuna 5 raises ``UpdateFinishedTrialError``, a ``RuntimeError``; Optuna 4 a plain ``RuntimeError``.)"""
        tries = []

        def end():
            tries.append(1)
            try:
                return self._inner.set_trial_state_values(trial_id, state, values)
            except RuntimeError:
                if len(tries) > 1 and self._inner.get_trial(trial_id).state == state:
                    return True
                raise
        return self._outage.call(end)

    names = set(private)
    for base in bases:
        names |= {n for n in dir(base) if not n.startswith("_") and callable(getattr(base, n))}
    body = {n: forward(n) for n in sorted(names - {"set_trial_state_values"})}
    body.update(__init__=__init__, __getattr__=__getattr__, set_trial_state_values=set_trial_state_values,
                __doc__="An Optuna storage whose calls wait out an outage (orchestrator.storage.retrying).")
    cls = type("RetryingStorage", bases, body)
    cls.__abstractmethods__ = frozenset()
    return cls

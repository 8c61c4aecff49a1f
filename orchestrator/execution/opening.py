"""Opening a study for work: created (``study run``, ``study create``) or joined (``study worker``).

Under the study's lock, so that processes started at the same instant on any machine agree: one
Optuna study, one stored study file (a different one is refused, naming the settings), one
budget, one MLflow experiment and parent run. Lost trials found on the way are ended and queued
again (:mod:`orchestrator.execution.claims`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from orchestrator import schema
from orchestrator.errors import OrchError, StoreError
from orchestrator.execution import claims
from orchestrator.execution.outcomes import close_runs, reconcile, run_verdict
from orchestrator.secrets import describe, redact_url
from orchestrator.spec.study import Study
from orchestrator.storage import probes, record
from orchestrator.storage.backends import open_storage
from orchestrator.storage.retrying import retrying
from orchestrator.tracking import client
from orchestrator.tracking.parent import parent_run, study_tracking_uri

_UNSET = object()


@dataclass
class Joined:
    """A study opened by :func:`open_study`."""

    ostudy: Any
    storage_url: str
    tracking_uri: str
    mlf: Any  # an MLflow client on tracking_uri
    parent_run_id: str
    lost: list[int]
    retried: list[int]


def open_study(study: Study, storage_url: str, *, create: bool, tracking_uri: str | None = None,
               budget: Any = _UNSET, outage=None) -> Joined:
    """Create (``create``) or join the study, under its lock, and find or create its parent run.

    Joining checks that ``study`` is the study that the storage holds (a changed search space or
    fixed setting is a :class:`~orchestrator.errors.SpecError` naming the settings). ``budget`` (``None``: no limit)
    replaces the stored budget. Lost trials found on the way are failed and queued again, and
    trial runs left RUNNING in MLflow whose trial has ended are closed in its state. ``outage``: an
    :class:`~orchestrator.outages.Outage` the study's storage calls go through once it is open.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lock = claims.claim_lock(storage_url, study.name)
    shown = redact_url(storage_url)
    if not create:
        record.load(storage_url, study.name)  # a clear message, before anything is created, if it is not there
    else:
        probes.probe_stores(storage_url, None)
    # a tracking store that cannot be used fails here, in seconds, before the study is created and not
    # while its lock is held: the one given, or the file's when creating
    client.check_store(tracking_uri or (study.base.tracking_uri if create else None)
                       or os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        with lock:
            ostudy = _load(study, storage_url, create, outage)
            attrs = ostudy.user_attrs
            record.check_spec(study, ostudy, attrs.get(schema.SPEC), shown, update=create)
            if budget is not _UNSET and attrs.get(schema.BUDGET, _UNSET) != budget:
                ostudy.set_user_attr(schema.BUDGET, budget)
            uri = study_tracking_uri(study, attrs.get(schema.TRACKING_URI), tracking_uri, create)
            if uri != tracking_uri:
                client.check_reachable(uri)
            probes.probe_stores(storage_url, uri)
            try:
                mlf = client.client(uri)
                parent = parent_run(mlf, study, ostudy, storage_url, uri, attrs, create)
            except OrchError:
                raise
            except Exception as exc:  # noqa: BLE001 - unreachable or refusing tracking server, ...
                raise StoreError(f"cannot use the MLflow tracking store {redact_url(uri)}: {describe(exc)}") from None
            lost, retried, _ = claims.reap(ostudy, verdict=run_verdict(mlf))
    except OrchError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreachable server, bad URL, missing driver, ...
        raise StoreError(f"cannot open the Optuna storage {shown}: {describe(exc)}") from None
    close_runs(mlf, lost)
    try:  # Optuna and MLflow agree again after an outage of either
        reconcile(ostudy, mlf, study.name)
    except Exception:  # noqa: BLE001 - the next run tries again
        pass
    return Joined(ostudy, storage_url, uri, mlf, parent, [e.number for e in lost], retried)


def _load(study: Study, storage_url: str, create: bool, outage=None):
    """The Optuna study, created if ``create`` and not there; its direction must be the file's."""
    import optuna

    storage = open_storage(storage_url, study.section.heartbeat)
    if outage is not None:
        storage = retrying(optuna.storages.get_storage(storage), outage)
    direction = study.section.direction
    if create:
        ostudy = optuna.create_study(study_name=study.name, storage=storage, direction=direction,
                                     load_if_exists=True)
    else:
        ostudy = record.load(storage_url, study.name, storage)
    stored = ostudy.direction.name.lower()
    if stored != direction:
        raise study.src.error("study.direction", f"study {study.name!r} in {redact_url(storage_url)} was created "
                              f"to {stored}, not {direction}; use another study name or storage")
    return ostudy

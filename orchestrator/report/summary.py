"""A study at a glance, as every view shows it (the terminal, ``--json``, the HTML page): its
summary rows, each trial's duration, numbers written short, and the command that retrains its best."""

from __future__ import annotations

import shlex
from typing import Any

from orchestrator.execution.outcomes import counts_of
from orchestrator.secrets import redact_url
from orchestrator.storage import record
from orchestrator.storage.urls import default_storage_url


def short(v: Any) -> str:
    """A value as tables show it: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def duration_of(trial) -> float | None:
    """Seconds from a finished trial's start to its end (``None`` while it runs)."""
    if trial.datetime_complete and trial.datetime_start:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def retrain_command(name: str, number: int, storage: str | None = None) -> str:
    """The command that retrains trial ``number`` of study ``name`` and tests it (``storage``: the
    study's storage URL, unless it is the default journal; one with a password is left to ``$ORCH_STORAGE``)."""
    where = ""
    if storage and redact_url(storage) != storage:  # a password: never printed; $ORCH_STORAGE holds it
        where = ' --storage "$ORCH_STORAGE"'
    elif storage:
        where = f" --storage {shlex.quote(storage)}"
    return f"orch train --from-study {shlex.quote(name)} --trial {number}{where} --test"


def retrain_for(ostudy, url: str) -> str | None:
    """The command that retrains and tests the study's best trial (``None``: no complete trial yet)."""
    try:
        number = ostudy.best_trial.number
    except ValueError:
        return None
    name = ostudy.study_name
    return retrain_command(name, number, None if url == default_storage_url(name) else url)


def summary(ostudy, url: str, stored, trials) -> list[tuple[str, str]]:
    """The study at a glance: name, storage, metric and direction, budget, sampler, pruner, counts, best."""
    metric, sampler, pruner = "value", "-", "-"
    if stored is not None:
        section = stored.section
        metric = section.metric
        sampler = " ".join([section.sampler.type, *(f"{k}={v}" for k, v in section.sampler.options.items())])
        pruner = " ".join([section.pruner.type, *(f"{k}={v}" for k, v in section.pruner.options.items())])
    best = "-"
    try:
        top = ostudy.best_trial
    except ValueError:
        top = None
    if top is not None:
        best = (f"trial {top.number}: {metric} {top.value:.6g}"
                + (f" ({', '.join(f'{k}={short(v)}' for k, v in top.params.items())})" if top.params else ""))
    counts = counts_of(trials)
    return [("study", ostudy.study_name), ("storage", redact_url(url)),
            ("metric", f"{metric} ({ostudy.direction.name.lower()})"),
            ("budget", str(record.budget(ostudy) or "none")), ("sampler", sampler), ("pruner", pruner),
            ("trials", ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "none"), ("best", best)]

"""``orch study``: the group of the study commands, each loaded only when it runs."""

from __future__ import annotations

import click

from orchestrator.cli.lazy import LazyGroup

#: each study command: ``module:function`` and its help's first sentence (``orch study --help``)
COMMANDS = {
    "best": ("orchestrator.cli.reading:best", "The best trial's number, value and params, as JSON."),
    "clean": ("orchestrator.cli.reading:clean", "Remove the study's checkpoints that no trial will resume from "
              "(--all: every one); prints what was removed, as JSON."),
    "copy": ("orchestrator.cli.stores:copy", "Copy study NAME, with every trial and orch's record of it, to another "
             "storage."),
    "create": ("orchestrator.cli.running:create", "Create the study in FILE (its MLflow experiment and parent run "
               "too) without running trials."),
    "repair": ("orchestrator.cli.stores:repair", "Rewrite a damaged journal file with every valid record, after a "
               "backup beside it."),
    "report": ("orchestrator.cli.reading:report", "One self-contained HTML page comparing the study's trials: "
               "summary, best trial and how to retrain it, trials table, learning curves, optimisation history, "
               "parallel coordinates and parameter importances. It opens from the file, with no server; prints "
               "its path."),
    "run": ("orchestrator.cli.running:run", "Run (or resume) the study in FILE until its trial budget is met."),
    "show": ("orchestrator.cli.reading:show", "The study (storage, metric, budget, sampler, best) and its trials: "
             "state, value, epochs, params."),
    "worker": ("orchestrator.cli.running:worker", "Join the existing study FILE|NAME and run its trials until its "
               "shared budget is met."),
}


@click.group(cls=LazyGroup, table=COMMANDS)
def study() -> None:
    """Optuna studies over run files: run, create, worker, show, best, report, clean, copy, repair."""

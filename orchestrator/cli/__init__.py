"""The ``orch`` command line: one module per command group, every error caught here, once.

A command raises an :class:`~orchestrator.errors.OrchError` (or lets one through) and the group
prints it as one line, ``error: ...`` with passwords hidden, and exits with its status (2: bad
input, 1: the work could not be done). Each command's module is imported only when that command
runs (``orch --help`` reads :data:`COMMANDS`), and heavy libraries (torch, Lightning, MLflow,
Optuna) only where they are used, so ``orch --help`` and ``orch plugins list`` start at once.
"""

from __future__ import annotations

import click

from orchestrator import __version__
from orchestrator.cli.lazy import LazyGroup
from orchestrator.errors import OrchError
from orchestrator.secrets import redact

#: each command: ``module:function`` and its help's first sentence (``orch --help``)
COMMANDS = {
    "doctor": ("orchestrator.cli.doctor:doctor", "Versions, GPUs, data, storage, tracking and plugins on one screen; "
               "exit 1 if the main job cannot run."),
    "plugins": ("orchestrator.cli.plugins:plugins", "Installed cell, dataset and module plugins."),
    "study": ("orchestrator.cli.study:study", "Optuna studies over run files: run, create, worker, show, best, report, "
              "clean, copy, repair."),
    "train": ("orchestrator.cli.train:train", "Train FILE's fixed settings once (a study section is ignored) and log "
              "it to MLflow."),
    "ui": ("orchestrator.cli.ui:ui", "Open the MLflow UI on the project's store (bound to 127.0.0.1 unless told "
           "otherwise)."),
}


class _Orch(LazyGroup):
    """The top-level group: an :class:`OrchError` from any command becomes one line and its exit status."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OrchError as exc:
            # one line, whatever the message holds (a plugin's own error may span several)
            click.echo(f"error: {redact(' '.join(line.strip() for line in str(exc).splitlines()))}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Orch, table=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="orch")
def main() -> None:
    """orch: plugin-based experiments for recurrent sequence models.

    Plugins (cells, datasets, modules) come from entry points; `orch train FILE` runs one
    configuration, `orch study run FILE` an Optuna study, `orch ui` opens the MLflow UI.
    """

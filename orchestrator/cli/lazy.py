"""Command groups whose commands are imported only when they run.

``orch --help`` and ``orch study --help`` list their commands from a table (name, the function
that implements it, its help's first sentence), so that listing them, or running one, imports
nothing that another command needs. ``tests/test_architecture.py`` checks each table against the
commands' own help.
"""

from __future__ import annotations

import importlib

import click


class LazyGroup(click.Group):
    """A group whose ``table`` maps each command name to ``"module:function"`` and its help's first
    sentence."""

    def __init__(self, *args, table: dict[str, tuple[str, str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.table = table

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.table)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.table:
            return None
        module, _, function = self.table[name][0].partition(":")
        return getattr(importlib.import_module(module), function)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(len(name) for name in self.table)
        with formatter.section("Commands"):
            formatter.write_dl([(name, click.Command(name, help=self.table[name][1]).get_short_help_str(limit))
                                for name in self.list_commands(ctx)])

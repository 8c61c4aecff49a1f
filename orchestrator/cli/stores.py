"""``orch study copy|repair``: a study moved to another storage, a damaged journal file mended."""

from __future__ import annotations

import json

import click

from orchestrator.cli.options import locate, storage_option
from orchestrator.errors import UsageError
from orchestrator.secrets import redact_url
from orchestrator.storage import journal, record
from orchestrator.storage.urls import file_of, journal_path


@click.command("copy")
@click.argument("name")
@click.option("--from", "source", required=True, help="Storage URL the study is in (journal:PATH for a journal file).")
@click.option("--to", "dest", required=True, help="Storage URL to copy it to, e.g. postgresql://user:pass@host/db.")
@click.option("--to-name", default=None, help="Name of the copy (default: the same).")
def copy(name, source, dest, to_name) -> None:
    """Copy study NAME, with every trial and orch's record of it, to another storage.

    For moving a study from the embedded journal file to PostgreSQL before adding machines: the
    copy goes on with the same budget, MLflow parent run and trial numbers. With --to-name it is a
    new study (its own MLflow experiment), run with study.name set to the new name.
    """
    n = record.copy_study(name, source, dest, to_name)
    click.echo(f"copied study {name!r} ({n} trials) from {redact_url(source)} to {redact_url(dest)}"
               + (f" as {to_name!r}" if to_name else ""), err=True)


@click.command("repair")
@click.argument("target", metavar="FILE|NAME")
@storage_option
@click.option("--force", is_flag=True, help="Drop damaged lines even where that renumbers trials.")
def repair(target: str, storage: str | None, force: bool) -> None:
    """Rewrite a damaged journal file with every valid record, after a backup beside it.

    For the default storage (a journal file), after `orch` refused it as damaged. A record cut
    off at the end by a crash needs no repair: it is cut away automatically.
    """
    _, url, _ = locate(target, storage)
    if journal_path(url) is None:
        raise UsageError(f"{url}: `orch study repair` mends journal files; a database is repaired with its own tools")
    report = journal.repair(file_of(url), force=force)
    click.echo(f"kept {report['kept']} records; dropped line(s) {report['dropped_lines'] or 'none'}; "
               f"backup: {report['backup']}", err=True)
    click.echo(json.dumps(report, indent=2))

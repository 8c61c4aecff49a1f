"""``orch study copy|repair``: a study moved to another storage, a damaged journal file mended."""

from __future__ import annotations

import json

import click

from orchestrator.cli.options import locate, storage_option
from orchestrator.errors import StoreError, UsageError
from orchestrator.execution.claims import claim_lock
from orchestrator.names import shown
from orchestrator.secrets import redact_url
from orchestrator.storage import journal, presence, record
from orchestrator.storage.locks import if_free
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
    off at the end by a crash needs no repair: it is cut away automatically. A file that is no
    journal of the study is refused, and so is one a process of this machine is using for a trial.
    """
    name, url, _ = locate(target, storage)
    if journal_path(url) is None:
        raise UsageError(f"{url}: `orch study repair` mends journal files; a database is repaired with its own tools")
    journal.check_kind(journal_path(url))  # before a lock file is made beside it
    with presence.alone(journal_path(url), name) as alone, if_free(claim_lock(url, name)) as free:
        if not alone or not free:  # a live `study run`/`study worker`, even between trials, or a claim
            raise StoreError(f"a process of study {shown(name)} is using {file_of(url)}: stop the study's "
                             "processes first (a repair rewrites the file under them); nothing was changed")
        report = journal.repair(file_of(url), name, force=force)
    click.echo(f"kept {report['kept']} records; dropped line(s) {report['dropped_lines'] or 'none'}; "
               f"backup: {report['backup']}", err=True)
    click.echo(json.dumps(report, indent=2))

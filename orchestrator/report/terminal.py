"""The study in the terminal: the progress line, the trials table (live while it runs, or once
for ``orch study show``) and the study's header."""

from __future__ import annotations

from datetime import datetime

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator import schema
from orchestrator.execution.outcomes import state_of
from orchestrator.report.summary import duration_of, short, summary


def progress_line(name: str, counts: dict[str, int], budget: int | None, best: float | None, metric: str) -> str:
    """``study NAME: 3/12 done (2 complete, 1 pruned, 0 failed), 2 running; best val_acc 0.98``."""
    done = counts["complete"] + counts["pruned"] + counts["failed"]
    total = f"/{budget}" if budget else ""
    best_text = f"{best:.6g}" if best is not None else "-"
    extra = "".join(f", {counts[k]} {k}" for k in ("interrupted", "lost") if counts.get(k))
    return (f"study {name}: {done}{total} done ({counts['complete']} complete, {counts['pruned']} pruned, "
            f"{counts['failed']} failed{extra}), {counts['running']} running; best {metric} {best_text}")


class LiveTable:
    """A live rich table of the trials, or nothing (plain progress lines) when not on a terminal."""

    def __init__(self, live: bool):
        self.live = None
        if live:
            self.live = Live(refresh_per_second=2, transient=False)

    def __enter__(self):
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.__exit__(*exc)

    def update(self, line: str, trials, max_epochs: int | None) -> None:
        self.live.update(Group(Text(line), trials_table(trials[-15:], max_epochs=max_epochs)))


def trials_table(trials, reasons: int | None = 60, max_epochs: int | None = None):
    """The trials as a rich table; ``reasons``: characters of a failure's reason to show (``None``:
    all); ``max_epochs``: the study's epochs per trial, for the ETA of running trials."""
    table = Table("trial", "state", "value", "epoch", "latest", "params", "duration", "ETA")
    now = datetime.now()
    for t in trials:
        duration = duration_of(t)
        params = ", ".join(f"{k}={short(v)}" for k, v in t.params.items())
        reason = t.user_attrs.get(schema.ERROR) if t.state.name in ("FAIL", "PRUNED") else None
        epochs = max(t.intermediate_values) + 1 if t.intermediate_values else 0
        latest = t.intermediate_values[epochs - 1] if epochs and epochs - 1 in t.intermediate_values else None
        total = t.params.get("trainer.max_epochs", max_epochs)
        total = total if isinstance(total, int) and total > 0 else None
        eta = "-"
        if t.state.name == "RUNNING" and t.datetime_start:
            duration = (now - t.datetime_start).total_seconds()
            done = epochs - int(t.user_attrs.get(schema.RESUMED_AT_EPOCH, 0))  # epochs this attempt ran
            if total and done > 0:
                eta = f"{duration / done * max(total - epochs, 0):.0f}s"
        state = state_of(t)
        if reason:  # "interrupted (SIGINT) while running ..." already says its state
            state = reason[:reasons] if reason.startswith(state) else f"{state} ({reason[:reasons]})"
        # Text, not str: a name, a choice or a reason holding "[x]" is shown as written, never as markup
        table.add_row(*map(Text, (str(t.number), state, short(t.value) if t.value is not None else "-",
                                  f"{epochs}/{total}" if total else str(epochs),
                                  short(latest) if latest is not None else "-", params,
                                  f"{duration:.1f}s" if duration is not None else "-", eta)))
    return table


def header(ostudy, url: str, trials, stored):
    """The study at a glance (:func:`~orchestrator.report.summary.summary`) as a two-column grid."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, text in summary(ostudy, url, stored, trials):
        grid.add_row(Text(key), Text(text))
    return grid

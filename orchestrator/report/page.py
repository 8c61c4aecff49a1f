"""Comparing a study's trials outside the MLflow UI: the figures on its parent run and a one-page report.

:func:`log_to_run` puts the figures (:mod:`orchestrator.report.figures`) on the parent run as PNG
files under ``plots/`` and, interactive, in ``report.html``: the same self-contained page that
``orch study report`` writes (summary, best trial and the command that retrains it, trials table,
figures), which opens from a file, offline, with no server.
"""

from __future__ import annotations

import contextlib
import html
from datetime import datetime, timezone

from orchestrator import schema
from orchestrator.execution.outcomes import state_of
from orchestrator.report.figures import figures, pngs
from orchestrator.report.summary import duration_of, short, summary

#: colours of the trial states in the report's table
COLOURS = {"complete": "#1f77b4", "pruned": "#ff7f0e", "failed": "#d62728", "interrupted": "#7f7f7f",
           "lost": "#7f7f7f", "running": "#2ca02c", "waiting": "#bcbd22"}


def page(ostudy, url: str, stored, retrain: str | None = None) -> str:
    """The study report: one self-contained HTML page (plotly.js inline; no server, no network)."""
    from plotly.offline import get_plotlyjs

    trials = ostudy.get_trials(deepcopy=False)
    metric = stored.section.metric if stored is not None else "value"
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary(ostudy, url, stored, trials))
    if retrain:
        rows += f"<tr><th>retrain</th><td><code>{esc(retrain)}</code></td></tr>"
    keys = sorted({k for t in trials for k in t.params})
    head = "".join(f"<th>{esc(k)}</th>" for k in ["trial", "state", metric, "epochs", *keys, "duration", "MLflow run"])
    body = []
    for t in trials:
        state = state_of(t)
        duration = duration_of(t)
        reason = t.user_attrs.get(schema.ERROR) if state in ("failed", "pruned") else None
        cells = [str(t.number), state + (f": {reason[:200]}" if reason else ""),
                 short(t.value) if t.value is not None else "-",
                 str(max(t.intermediate_values) + 1) if t.intermediate_values else "0",
                 *(short(t.params[k]) if k in t.params else "" for k in keys),
                 f"{duration:.1f}s" if duration is not None else "-", t.user_attrs.get(schema.RUN_ID, "")]
        body.append(f'<tr class="{state}">' + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    errors: dict[str, str] = {}
    plots = "".join(f'<section><h2>{esc(name.replace("_", " "))}</h2>'
                    f'{fig.to_html(full_html=False, include_plotlyjs=False, div_id=name)}</section>'
                    for name, fig in figures(ostudy, metric, errors).items())
    plots += "".join(f"<p>{esc(name.replace('_', ' '))}: not drawn ({esc(why)})</p>" for name, why in errors.items())
    colours = "".join(f"tr.{s} td:nth-child(2){{color:{c}}}" for s, c in COLOURS.items())
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>orch study {esc(ostudy.study_name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}}#trials td{{font-variant-numeric:tabular-nums}}
{colours}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head><body>
<h1>Study {esc(ostudy.study_name)}</h1><table id="summary">{rows}</table>
<h2>Trials</h2><table id="trials"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>
{plots}<p><small>orch study report, {made}</small></p></body></html>
"""


def log_to_run(ostudy, mlf, run_id: str, url: str, stored, retrain: str | None = None) -> None:
    """The figures as ``plots/NAME.png`` and the report as ``report.html`` on the run ``run_id``; a
    figure that cannot be drawn or stored is noted in a ``plots.NAME.error`` tag instead of failing
    the study."""
    import matplotlib.pyplot as plt

    metric = stored.section.metric if stored is not None else "value"
    errors: dict[str, str] = {}

    def keep(name: str, store) -> None:
        try:
            store()
        except Exception as exc:  # noqa: BLE001 - a figure is not worth failing a study over
            errors[name] = f"{type(exc).__name__}: {exc}"[:500]

    for name, fig in pngs(ostudy, metric, errors).items():
        keep(name, lambda fig=fig, name=name: mlf.log_figure(run_id, fig, f"{schema.PLOTS}/{name}.png"))
        plt.close(fig)
    keep("report", lambda: mlf.log_text(run_id, page(ostudy, url, stored, retrain), schema.REPORT))
    for name, why in errors.items():
        with contextlib.suppress(Exception):  # the store itself may be what failed
            mlf.set_tag(run_id, schema.PLOT_ERROR.format(name), why)

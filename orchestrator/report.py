"""Comparing a study's trials outside the MLflow UI: the figures on its parent run and a one-page report.

Four figures, each drawn from the Optuna storage alone (so a report needs no tracking server):
the optimisation history, the learning curves (every trial's study metric per epoch, as it was
reported to the pruner), parallel coordinates over the searched parameters, and the parameters'
importances (fANOVA). :func:`log_to_run` puts them on the parent run as PNG files under
``plots/`` and, interactive, in ``report.html``: the same self-contained page that ``orch study
report`` writes (summary, best trial and the command that retrains it, trials table, figures),
which opens from a file, offline, with no server.
"""

from __future__ import annotations

import contextlib
import html
import warnings
from datetime import datetime, timezone
from typing import Any

from orchestrator import claims
from orchestrator.coordinator import state_of
from orchestrator.secrets import redact_url

#: line styles of the trial states in the learning curves (plotly, matplotlib)
DASHES = {"complete": ("solid", "-"), "pruned": ("dash", "--"), "failed": ("dot", ":")}
#: colours of the trial states in the report's table
COLOURS = {"complete": "#1f77b4", "pruned": "#ff7f0e", "failed": "#d62728", "interrupted": "#7f7f7f",
           "lost": "#7f7f7f", "running": "#2ca02c", "waiting": "#bcbd22"}


def short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def retrain_command(name: str, number: int, storage: str | None = None) -> str:
    """The command that retrains trial ``number`` of study ``name`` and tests it (``storage``: the
    study's storage URL, unless it is the default journal; one with a password is left to ``$ORCH_STORAGE``)."""
    import shlex

    where = ""
    if storage and redact_url(storage) != storage:  # a password: never printed; $ORCH_STORAGE holds it
        where = ' --storage "$ORCH_STORAGE"'
    elif storage:
        where = f" --storage {shlex.quote(storage)}"
    return f"orch train --from-study {shlex.quote(name)} --trial {number}{where} --test"


def summary(ostudy, url: str, stored, trials) -> list[tuple[str, str]]:
    """The study at a glance: name, storage, metric and direction, budget, sampler, pruner, counts, best."""
    from orchestrator import record
    from orchestrator.coordinator import best_of, counts_of

    metric, sampler, pruner = "value", "-", "-"
    if stored is not None:
        section = stored.section
        metric = section.metric
        sampler = " ".join([section.sampler.type, *(f"{k}={v}" for k, v in section.sampler.options.items())])
        pruner = " ".join([section.pruner.type, *(f"{k}={v}" for k, v in section.pruner.options.items())])
    value, params = best_of(ostudy)
    best = "-"
    if value is not None:
        best = (f"trial {ostudy.best_trial.number}: {metric} {value:.6g}"
                + (f" ({', '.join(f'{k}={short(v)}' for k, v in params.items())})" if params else ""))
    counts = counts_of(trials)
    return [("study", ostudy.study_name), ("storage", redact_url(url)),
            ("metric", f"{metric} ({ostudy.direction.name.lower()})"),
            ("budget", str(record.budget(ostudy) or "none")), ("sampler", sampler), ("pruner", pruner),
            ("trials", ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "none"), ("best", best)]


def _curves(trials):
    """Each trial's (epochs, values) of the study metric, in trial order, for trials with any."""
    for t in trials:
        if t.intermediate_values:
            epochs = sorted(t.intermediate_values)
            yield t, epochs, [t.intermediate_values[e] for e in epochs]


def _importances(ostudy, complete) -> dict[str, float]:
    """fANOVA importances of the searched parameters that took more than one value ({} if none)."""
    import optuna

    varied = {k for t in complete for k in t.params if len({repr(u.params.get(k)) for u in complete}) > 1}
    if len(complete) < 2 or not varied:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.importance.get_param_importances(ostudy, params=sorted(varied))


def _drawn(makers: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    """Each figure that its maker draws; the reason of each that cannot be drawn goes to ``errors``
    (a figure is not worth failing a study or a report over)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in makers.items():
            try:
                out[name] = make()
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"{type(exc).__name__}: {exc}"[:500]
    return out


def _makers(ostudy, metric: str, errors: dict[str, str], curves, history, parallel, bars) -> dict[str, Any]:
    """The figures to draw, in reading order, for the trials there are (importances computed once)."""
    trials = ostudy.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    makers = {"learning_curves": lambda: curves(trials)}
    if complete:
        makers["optimization_history"] = history
    if len(complete) >= 2 and any(t.params for t in complete):
        makers["parallel_coordinate"] = parallel
    importances = _drawn({"param_importances": lambda: _importances(ostudy, complete)}, errors)
    if importances.get("param_importances"):
        makers["param_importances"] = lambda: bars(importances["param_importances"])
    return makers


# ---- interactive (plotly) -------------------------------------------------------------------------
def figures(ostudy, metric: str, errors: dict[str, str] | None = None) -> dict[str, Any]:
    """The study's figures as plotly figures, by name, in reading order."""
    import plotly.graph_objects as go
    from optuna import visualization as vis

    def curves(trials):
        fig = go.Figure()
        for t, epochs, values in _curves(trials):
            fig.add_trace(go.Scatter(
                x=epochs, y=values, mode="lines+markers", name=f"trial {t.number} ({state_of(t)})",
                line={"dash": DASHES.get(state_of(t), ("dashdot", ""))[0]},
                hovertext=", ".join(f"{k}={short(v)}" for k, v in t.params.items())))
        fig.update_layout(title=f"Learning curves: {metric} per epoch (solid: complete, dashed: pruned, "
                                "dotted: failed)", xaxis_title="epoch", yaxis_title=metric)
        fig.update_xaxes(tickformat="d")
        return fig

    def bars(importances):
        names = list(importances)[::-1]
        fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h"))
        fig.update_layout(title=f"Parameter importances for {metric} (fANOVA)", xaxis_title="importance")
        return fig

    errors = {} if errors is None else errors
    return _drawn(_makers(ostudy, metric, errors, curves,
                          lambda: vis.plot_optimization_history(ostudy, target_name=metric),
                          lambda: vis.plot_parallel_coordinate(ostudy, target_name=metric), bars), errors)


# ---- static (matplotlib) --------------------------------------------------------------------------
def pngs(ostudy, metric: str, errors: dict[str, str] | None = None) -> dict[str, Any]:
    """The same figures as matplotlib figures (closed by the caller), by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    def curves(trials):
        fig, ax = plt.subplots(figsize=(10, 6))
        for t, epochs, values in _curves(trials):
            state = state_of(t)
            ax.plot(epochs, values, marker="o", linestyle=DASHES.get(state, ("", "-."))[1], alpha=0.8,
                    label=f"{t.number} ({state})")
        ax.set(title=f"Learning curves: {metric} per epoch", xlabel="epoch", ylabel=metric)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if 0 < len(ax.lines) <= 20:
            ax.legend(title="trial", fontsize="small")
        return fig

    def optuna_figure(draw):
        ax = draw(ostudy, target_name=metric)
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(10, 6)
        return fig

    def bars(importances):
        fig, ax = plt.subplots(figsize=(10, 6))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(title=f"Parameter importances for {metric} (fANOVA)", xlabel="importance")
        fig.tight_layout()
        return fig

    errors = {} if errors is None else errors
    return _drawn(_makers(ostudy, metric, errors, curves, lambda: optuna_figure(ovm.plot_optimization_history),
                          lambda: optuna_figure(ovm.plot_parallel_coordinate), bars), errors)


# ---- the page -------------------------------------------------------------------------------------
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
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
            t.datetime_start else None
        reason = t.user_attrs.get(claims.ERROR_ATTR) if state in ("failed", "pruned") else None
        cells = [str(t.number), state + (f": {reason[:200]}" if reason else ""),
                 short(t.value) if t.value is not None else "-",
                 str(max(t.intermediate_values) + 1) if t.intermediate_values else "0",
                 *(short(t.params[k]) if k in t.params else "" for k in keys),
                 f"{duration:.1f}s" if duration is not None else "-", t.user_attrs.get(claims.RUN_ATTR, "")]
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
        keep(name, lambda: mlf.log_figure(run_id, fig, f"plots/{name}.png"))
        plt.close(fig)
    keep("report", lambda: mlf.log_text(run_id, page(ostudy, url, stored, retrain), "report.html"))
    for name, why in errors.items():
        with contextlib.suppress(Exception):  # the store itself may be what failed
            mlf.set_tag(run_id, f"plots.{name}.error", why)

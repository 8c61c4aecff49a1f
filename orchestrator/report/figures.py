"""The study's figures, drawn from the Optuna storage alone (so a report needs no tracking server):
the learning curves (every trial's study metric per epoch, as reported to the pruner), the
optimisation history, parallel coordinates over the searched parameters, and the parameters'
importances (fANOVA); interactive (plotly: :func:`figures`) or static (matplotlib: :func:`pngs`).
"""

from __future__ import annotations

import warnings
from typing import Any

from orchestrator.execution.outcomes import state_of
from orchestrator.report.summary import short

#: line styles of the trial states in the learning curves (plotly, matplotlib)
DASHES = {"complete": ("solid", "-"), "pruned": ("dash", "--"), "failed": ("dot", ":")}


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

"""How a study looks in the MLflow UI: where comparing trials starts.

MLflow 3's UI opens an experiment in its GenAI mode unless the experiment says it holds model
training (tag ``mlflow.experimentKind``), and keeps the runs table's columns, sort and filter in
the browser, or in a *shared view*: an experiment tag ``mlflow.sharedViewState.KEY`` holding the
view as JSON, opened by the URL parameter ``viewStateShareKey=KEY``. orch marks every experiment
it creates as model training and saves, for each study, the view "trial runs sorted by the
study's metric, with that metric, the searched parameters and each trial's state as columns";
``orch ui STUDY`` prints (or opens) the link to it. Trial runs are named after their number and
searched values, so that a list of them reads without opening any.
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator import schema


def column(kind: str, key: str) -> str:
    """A runs-table column id of the MLflow UI (``kind``: attributes, params, metrics, tags)."""
    return f"{kind}.`{key}`"


def trial_view(metric: str, direction: str, params: list[str]) -> dict[str, Any]:
    """The study's view: its trial runs, best first, with the metric, searched parameters and states."""
    return {
        "searchFilter": f"tags.`{schema.ROLE}` = 'trial'",
        "orderByKey": column("metrics", metric),
        "orderByAsc": direction == "minimize",
        "lifecycleFilter": "Active",
        "selectedColumns": [column("metrics", metric), *(column("params", p) for p in params),
                            column("tags", schema.STATE), column("tags", schema.TRIAL),
                            column("attributes", "Duration")],
        "runsHiddenMode": "SHOW_ALL",
        "runsExpanded": {},
    }


def save_study_view(mlf, experiment_id: str, study) -> None:
    """Mark the experiment as model training and save the study's view of its trials."""
    section = study.section
    view = trial_view(section.metric, section.direction, list(section.space))
    mlf.set_experiment_tag(experiment_id, schema.EXPERIMENT_KIND, schema.MODEL_TRAINING)
    mlf.set_experiment_tag(experiment_id, schema.VIEW_TAG_PREFIX + schema.VIEW_KEY, json.dumps(view))


def study_url(ui_base: str, experiment_id: str) -> str:
    """The link that opens the study's view in the MLflow UI at ``ui_base`` (http://host:port)."""
    return f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={schema.VIEW_KEY}"


def run_name(number: int, params: dict[str, Any]) -> str:
    """``trial-7 lstm hidden_size=48 lr=0.0123``: the trial and its searched values, short."""
    parts = []
    for key, value in params.items():
        short = key.rsplit(".", 1)[-1]
        if short == "plugin":
            parts.append(str(value))
        else:
            parts.append(f"{short}={value:.4g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join([f"trial-{number}", *parts])[:250]

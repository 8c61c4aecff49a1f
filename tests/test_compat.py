"""A study written by an earlier orch still opens, shows, reports and resumes.

``fixtures/compat`` holds the journal and the MLflow store of a study made at 60783a1, before the
restructuring of the core (its README says how): trials 0 and 1 complete, trial 2 interrupted by
SIGTERM. Its names in Optuna and MLflow are orch's on-disk schema (``orchestrator.schema``).
"""

from __future__ import annotations

import json
import sqlite3
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner
from packaging.version import Version

from orchestrator.cli import main

from helpers import check_agreement, load, orch

FIXTURE = Path(__file__).parent / "fixtures" / "compat"
#: the MLflow that wrote the fixture's store: an older MLflow cannot open a store of a newer schema
WRITTEN_BY_MLFLOW = Version("3.17.2")


@pytest.fixture
def old_study(tmp_path, monkeypatch):
    """The fixture's study under ``tmp_path`` (``mlruns/`` and the study file), as a user who moved
    the project folder would have it; the working folder is ``tmp_path``."""
    store = tmp_path / "mlruns"
    (store / "optuna").mkdir(parents=True)
    journal = (FIXTURE / "compat.journal").read_text().replace("@ROOT@", str(tmp_path))
    (store / "optuna" / "compat.journal").write_text(journal)
    db = sqlite3.connect(store / "mlflow.db")
    db.executescript((FIXTURE / "mlflow.sql").read_text().replace("@ROOT@", str(tmp_path)))
    db.close()
    (tmp_path / "compat.yaml").write_text((FIXTURE / "compat.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_study_written_before_shows_and_reports_in_orchs_states(old_study):
    shown = CliRunner().invoke(main, ["study", "show", "compat", "--json"])
    assert shown.exit_code == 0, shown.output
    trials = json.loads(shown.stdout)
    assert [(t["number"], t["state"]) for t in trials] == [(0, "complete"), (1, "complete"), (2, "interrupted")]
    assert trials[2]["error"].startswith("interrupted (SIGTERM) while running")
    assert trials[0]["value"] == pytest.approx(0.98833, abs=1e-4) and trials[0]["duration_s"] > 0
    assert set(trials[2]["params"]) == {"cell.plugin", "cell.hidden_size", "cell.forget_bias"}

    table = CliRunner().invoke(main, ["study", "show", "compat.yaml"], env={"COLUMNS": "250"})
    assert table.exit_code == 0, table.output
    assert "budget" in table.stdout and "3" in table.stdout and "interrupted" in table.stdout

    best = CliRunner().invoke(main, ["study", "best", "compat"])
    assert best.exit_code == 0, best.output
    found = json.loads(best.stdout)
    assert found["trial"] == 0 and found["retrain"] == "orch train --from-study compat --trial 0 --test"

    report = CliRunner().invoke(main, ["study", "report", "compat", "--out", "out"])
    assert report.exit_code == 0, report.output
    page = (old_study / "out" / "compat-report.html").read_text()
    assert "<h1>Study compat</h1>" in page and page.count('<tr class="complete">') == 2
    assert page.count('<tr class="interrupted">') == 1


@pytest.mark.slow  # one trial in a real worker process, about 40 s
@pytest.mark.skipif(Version(version("mlflow")) < WRITTEN_BY_MLFLOW,
                    reason=f"the fixture's MLflow store has the schema of MLflow {WRITTEN_BY_MLFLOW}; an older MLflow "
                           "refuses it (`mlflow db upgrade` goes one way)")
def test_a_study_written_before_resumes_its_interrupted_trial_under_the_same_parent_run(old_study):
    before, _, parents, _ = load(old_study, "compat")
    parent = before.user_attrs["orch.parent_run_id"]
    assert [p.info.run_id for p in parents] == [parent]

    done = orch("study", "run", "compat.yaml", "--trials", "3", "--workers", "1", cwd=old_study)
    assert done.returncode == 0, done.stderr
    assert "queued to run again with the same parameters" in done.stderr

    study, client, parents, children = load(old_study, "compat")
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    retry = trials[3]
    assert retry.user_attrs["orch.retry_of"] == 2 and retry.user_attrs["orch.attempt"] == 2
    assert retry.params == trials[2].params  # the interrupted trial, run again with its parameters
    by_trial = check_agreement(study, parents, children)  # one parent run: the one the old orch created
    assert parents[0].info.run_id == parent and parents[0].info.status == "FINISHED"
    assert by_trial[2].data.tags["orch.state"] == "interrupted" and by_trial[3].data.tags["orch.state"] == "complete"
    assert by_trial[3].data.metrics["val_acc"] == pytest.approx(retry.value)
    assert {a.path for a in client.list_artifacts(parent)} >= {"report.html", "plots"}  # made anew for 4 trials

"""orch's decisions, each on its own, in milliseconds: claiming under a budget, requeueing
interrupted and lost trials, the loss limit, the one writer of a trial's final state, ``--set``
overrides, worker slots and the search space's conditions. Optuna's in-memory storage stands in
for a study's (the same code runs on a journal or a database); the end-to-end paths are
``test_study.py``, ``test_faults.py`` and ``test_distributed.py``."""

from __future__ import annotations

import contextlib
import time

import optuna
import pytest

from orchestrator import schema
from orchestrator.errors import SpecError
from orchestrator.execution import claims
from orchestrator.execution.outcomes import MAX_LOSSES, conclude, counts_of, end_for_worker, retryable, state_of
from orchestrator.execution.slots import Slot, plan_slots
from orchestrator.spec.files import apply_overrides, override_keys
from orchestrator.spec.space import CategoricalParam, FloatParam, IntParam, corners, resolve_params
from orchestrator.storage.owners import worker_id


@pytest.fixture
def ostudy():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize")


def running(ostudy, owner: str | None = None, **attrs):
    """A trial claimed by ``owner`` (default: this process), with ``module.lr`` drawn."""
    trial = ostudy.ask()
    trial.suggest_float("module.lr", 1e-3, 1e-1, log=True)
    trial.set_user_attr(schema.WORKER, owner or worker_id())
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return trial


# ---- claiming under a budget -----------------------------------------------------------------------
def test_claims_stop_at_the_budget_and_wait_while_a_trial_may_still_be_lost(ostudy):
    ostudy.set_user_attr(schema.BUDGET, 2)
    lock = contextlib.nullcontext()
    first = claims.claim(ostudy, lock, None, mlf=None)
    second = claims.claim(ostudy, lock, None, mlf=None)
    assert (first.number, second.number) == (0, 1)
    assert first.user_attrs[schema.WORKER] == worker_id()
    t = time.monotonic()  # budget taken, trials still running: it waits (one may be lost) until the deadline
    assert claims.claim(ostudy, lock, time.time() + 0.3, mlf=None, poll=0.1) is None
    assert 0.25 < time.monotonic() - t < 2
    ostudy.tell(first, 0.5)
    ostudy.tell(second, 0.6)
    t = time.monotonic()  # nothing running: the budget is met, at once
    assert claims.claim(ostudy, lock, None, mlf=None) is None and time.monotonic() - t < 0.5
    ostudy.set_user_attr(schema.BUDGET, 3)  # `study run --trials 3` raised it: the next claim goes on
    assert claims.claim(ostudy, lock, None, mlf=None).number == 2


def test_a_stop_request_ends_the_wait_for_a_trial(ostudy):
    ostudy.set_user_attr(schema.BUDGET, 1)
    claims.claim(ostudy, contextlib.nullcontext(), None, mlf=None)
    t = time.monotonic()
    assert claims.claim(ostudy, contextlib.nullcontext(), None, mlf=None, stop=lambda: time.monotonic() - t > 0.2) \
        is None
    assert time.monotonic() - t < 1


def test_retryable_trials_and_waiting_ones_use_no_budget(ostudy):
    done = ostudy.ask()
    ostudy.tell(done, 1.0)
    failed = ostudy.ask()
    ostudy.tell(failed, state=optuna.trial.TrialState.FAIL)
    for attr in (schema.INTERRUPTED, schema.LOST):
        trial = ostudy.ask()
        trial.set_user_attr(attr, True)
        ostudy.tell(trial, state=optuna.trial.TrialState.FAIL)
    ostudy.enqueue_trial({"module.lr": 0.01})
    trials = ostudy.get_trials(deepcopy=False)
    assert [state_of(t) for t in trials] == ["complete", "failed", "interrupted", "lost", "waiting"]
    assert [retryable(t) for t in trials] == [False, False, True, True, False]
    assert claims.counted(trials) == 2
    assert counts_of(trials) == {"complete": 1, "pruned": 0, "failed": 1, "interrupted": 1, "lost": 1,
                                 "running": 0, "waiting": 1}


# ---- requeue and the loss limit --------------------------------------------------------------------
def test_interrupted_and_lost_trials_are_queued_once_with_their_parameters_and_line(ostudy):
    stopped = running(ostudy)
    gone = running(ostudy, owner="elsewhere~abc123:4242")
    ended = end_for_worker(ostudy, [stopped], lambda t: "interrupted while running", "interrupted")
    ended += end_for_worker(ostudy, [gone], lambda t: "lost: its worker died", "lost")
    assert [(e.number, e.state) for e in ended] == [(0, "interrupted"), (1, "lost")]
    assert claims.requeue(ostudy) == [0, 1] and claims.requeue(ostudy) == []  # queued once
    retries = ostudy.get_trials(deepcopy=False)[2:]
    assert [t.state.name for t in retries] == ["WAITING", "WAITING"]
    assert [(t.user_attrs[schema.RETRY_OF], t.user_attrs[schema.ATTEMPT], t.user_attrs[schema.LINEAGE],
             t.user_attrs[schema.LOSSES]) for t in retries] == [(0, 2, 0, 0), (1, 2, 1, 1)]  # interruptions are free
    again = ostudy.ask()  # the next claim runs the first retry with its trial's parameter
    assert again.number == 2 and again.suggest_float("module.lr", 1e-3, 1e-1, log=True) == stopped.params["module.lr"]


def test_a_line_lost_three_times_counts_as_a_failure_and_is_not_retried(ostudy):
    trial = running(ostudy, **{schema.LOSSES: MAX_LOSSES - 1, schema.RETRY_OF: 5, schema.LINEAGE: 5})
    [ended] = end_for_worker(ostudy, [trial], lambda t: "lost: its worker died", "lost")
    assert ended.state == "failed" and f"lost {MAX_LOSSES} times" in ended.reason
    [t] = ostudy.get_trials(deepcopy=False)
    assert state_of(t) == "failed" and not retryable(t) and claims.counted([t]) == 1
    assert claims.requeue(ostudy) == []


def test_orphans_are_the_trials_of_dead_or_named_workers_of_this_machine(ostudy):
    mine = running(ostudy)  # this process: alive
    dead_pid = running(ostudy, owner=worker_id(2 ** 22 + 12345))  # no such process
    elsewhere = running(ostudy, owner="elsewhere~abc123:4242")
    ownerless = ostudy.ask()  # a worker died between asking and recording itself
    lost = claims.fail_orphans(ostudy)
    assert sorted(e.number for e in lost) == [dead_pid.number, ownerless.number]
    assert {t.number: state_of(t) for t in ostudy.get_trials(deepcopy=False)} == {
        mine.number: "running", dead_pid.number: "lost", elsewhere.number: "running",
        ownerless.number: "interrupted"}  # it never trained: no try of its line is used up
    stopped = claims.fail_orphans(ostudy, dead={worker_id()}, interrupted=True)
    assert [e.number for e in stopped] == [mine.number] and state_of(ostudy.trials[mine.number]) == "interrupted"


# ---- the one writer of a trial's final state -------------------------------------------------------
@pytest.fixture(scope="module")
def mlf(tmp_path_factory):
    from orchestrator.tracking.client import client

    return client(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


def test_a_worker_ends_its_trial_in_mlflow_and_optuna_alike(ostudy, mlf):
    from orchestrator.tracking.runs import start_run

    for state, value in (("complete", 0.9), ("pruned", None), ("failed", None)):
        trial = running(ostudy)
        run_id = start_run(mlf, "decisions", run_name=f"trial-{trial.number}")
        assert conclude(ostudy, trial, mlf, run_id, state, value=value, error="why" if value is None else None) == state
        run = mlf.get_run(run_id)
        assert state_of(ostudy.trials[trial.number]) == state == run.data.tags[schema.STATE]
        assert run.info.status == schema.RUN_STATUS[state]


def test_a_trial_declared_lost_meanwhile_stays_lost_in_both_stores(ostudy, mlf):
    from orchestrator.tracking.runs import start_run

    trial = running(ostudy)
    run_id = start_run(mlf, "decisions", run_name=f"trial-{trial.number}")
    end_for_worker(ostudy, [trial], lambda t: "lost: no heartbeat", "lost")  # another machine's verdict
    assert conclude(ostudy, trial, mlf, run_id, "complete", value=0.9) == "lost"
    run = mlf.get_run(run_id)
    assert state_of(ostudy.trials[trial.number]) == "lost" == run.data.tags[schema.STATE]
    assert run.info.status == "KILLED" and run.info.run_name.endswith("[lost]")


# ---- --set overrides ---------------------------------------------------------------------------------
def test_overrides_parse_yaml_values_and_reach_dotted_keys():
    data = {"cell": {"hidden_size": 8}, "study": {"space": {"cell.hidden_size": {"type": "int", "high": 16}}}}
    out = apply_overrides(data, ["cell.hidden_size=200", "trainer.max_epochs=3", "module.lr=1e-3",
                                 "study.space.cell.hidden_size.high=400", "cell.name=lstm", "seed="])
    assert out["cell"] == {"hidden_size": 200, "name": "lstm"} and out["trainer"] == {"max_epochs": 3}
    assert out["module"]["lr"] == 0.001  # YAML 1.2 floats: 1e-3 is a number
    assert out["study"]["space"]["cell.hidden_size"] == {"type": "int", "high": 400}  # the longest existing key
    assert out["seed"] is None and data["cell"] == {"hidden_size": 8}  # a copy: the input is untouched
    assert override_keys(["a.b=1", " c = 2"]) == ("a.b", "c")


@pytest.mark.parametrize("item,message", [("cell.hidden_size", "expected KEY=VALUE"), ("=3", "expected KEY=VALUE"),
                                          ("cell.hidden_size.x=1", "'hidden_size' is not a section")])
def test_a_bad_override_is_one_message_naming_it(item, message):
    with pytest.raises(SpecError, match=message):
        apply_overrides({"cell": {"hidden_size": 8}}, [item])


# ---- worker slots ------------------------------------------------------------------------------------
def test_slots_pack_trials_per_gpu_and_split_the_cores():
    assert plan_slots(accelerator="auto", devices=None, workers=None, trials_per_device=2, gpu_count=2,
                      cpu_count=16) == [Slot(0, 0, 4), Slot(1, 0, 4), Slot(2, 1, 4), Slot(3, 1, 4)]
    assert plan_slots(accelerator="gpu", devices=[1], workers=None, trials_per_device=1, gpu_count=4,
                      cpu_count=16) == [Slot(0, 1, 16)]
    cpu = plan_slots(accelerator="cpu", devices=None, workers=3, trials_per_device=1, gpu_count=4, cpu_count=2)
    assert cpu == [Slot(0, None, 1), Slot(1, None, 1), Slot(2, None, 1)] and cpu[0].device == "cpu"
    assert plan_slots(accelerator="auto", devices=None, workers=None, trials_per_device=1, gpu_count=0,
                      cpu_count=8) == [Slot(0, None, 8)]


# ---- the search space's conditions ---------------------------------------------------------------------
class _Space:
    def __init__(self, **space):
        self.space = space


SPACE = _Space(**{
    "cell.plugin": CategoricalParam(type="categorical", choices=["rnn", "lstm"]),
    "cell.forget_bias": FloatParam(type="float", low=0.0, high=2.0, when={"cell.plugin": ["lstm"]}),
    "cell.hidden_size": IntParam(type="int", low=4, high=16, step=4),
    "module.momentum": FloatParam(type="float", low=0.0, high=0.9, when={"module.optimizer": ["sgd"]}),
})


def test_a_conditional_parameter_exists_only_when_earlier_or_fixed_settings_allow_it():
    pick = {"cell.plugin": "rnn", "cell.forget_bias": 1.0, "cell.hidden_size": 8, "module.momentum": 0.5}
    active = resolve_params(SPACE, lambda k, p: pick[k], {"module": {"optimizer": "adam"}})
    assert active == {"cell.plugin": "rnn", "cell.hidden_size": 8}
    pick["cell.plugin"] = "lstm"
    active = resolve_params(SPACE, lambda k, p: pick[k], {"module": {"optimizer": "sgd"}})
    assert list(active) == ["cell.plugin", "cell.forget_bias", "cell.hidden_size", "module.momentum"]


def test_the_file_check_tries_every_choice_with_every_range_at_both_ends():
    found = corners(SPACE, {"module": {"optimizer": "sgd"}})
    assert len(found) == 4  # 2 choices x (low, high)
    assert {"cell.plugin": "lstm", "cell.forget_bias": 2.0, "cell.hidden_size": 16, "module.momentum": 0.9} in found
    assert {"cell.plugin": "rnn", "cell.hidden_size": 4, "module.momentum": 0.0} in found

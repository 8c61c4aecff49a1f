"""``orch study run`` and ``orch study worker``: open the study, start the workers, watch them, summarise.

Both commands do the same on their machine: one worker process per device slot, replaced if it
dies, until the study's shared budget is met. ``study run`` may create the study and sets its
budget; ``study worker`` joins a study that exists (on any machine that reaches its storage).
The trials themselves are claimed, run and recorded by the workers (:mod:`orchestrator.workers`).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import claims, probes, record, stopping, workers
from orchestrator.config import SpecError
from orchestrator.secrets import redact_url
from orchestrator.study import Study, default_storage_url, grid_size


@dataclass
class Outcome:
    name: str
    counts: dict[str, int]
    best_value: float | None
    best_params: dict = field(default_factory=dict)
    parent_run_id: str | None = None
    #: the trials this invocation's workers ran, and how those that failed failed
    ran: list[int] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def all_failed(self) -> bool:
        """Every trial this invocation ran failed (interrupted and lost ones aside)."""
        return bool(self.ran) and sum(self.failures.values()) == len(self.ran)


def study_budget(study: Study, trials: int | None) -> int | None:
    """The budget a ``study run`` or ``study create`` sets: ``--trials``, else the file's, capped at a grid's size."""
    budget = trials if trials is not None else study.section.trials
    size = grid_size(study.section)
    if size is not None and (budget is None or budget > size):
        budget = size  # a grid is done once every point has been tried
    return budget


def state_of(trial) -> str:
    """complete, pruned, failed, running or waiting; ``interrupted`` (stopped by the user) and
    ``lost`` (with their worker), both retried and using no budget, apart from ``failed``."""
    key = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
           "WAITING": "waiting"}[trial.state.name]
    if key == "failed" and trial.user_attrs.get(claims.INTERRUPTED_ATTR):
        return "interrupted"
    if key == "failed" and trial.user_attrs.get(claims.LOST_ATTR):
        return "lost"
    return key


def counts_of(trials) -> dict[str, int]:
    """Trials by :func:`state_of`."""
    out = {"complete": 0, "pruned": 0, "failed": 0, "interrupted": 0, "lost": 0, "running": 0, "waiting": 0}
    for t in trials:
        out[state_of(t)] += 1
    return out


def best_of(ostudy) -> tuple[float | None, dict]:
    try:
        best = ostudy.best_trial
    except ValueError:
        return None, {}
    return best.value, best.params


def _progress(name: str, counts: dict[str, int], budget: int | None, best: float | None, metric: str) -> str:
    done = counts["complete"] + counts["pruned"] + counts["failed"]
    total = f"/{budget}" if budget else ""
    best_text = f"{best:.6g}" if best is not None else "-"
    extra = "".join(f", {counts[k]} {k}" for k in ("interrupted", "lost") if counts.get(k))
    return (f"study {name}: {done}{total} done ({counts['complete']} complete, {counts['pruned']} pruned, "
            f"{counts['failed']} failed{extra}), {counts['running']} running; best {metric} {best_text}")


def run_study(study: Study, *, trials: int | None, timeout: float | None, workers_n: int | None,
              devices: list[int] | None, storage_url: str | None, tracking_uri: str | None,
              trials_per_device: int | None = None, create: bool = True, echo=print, live: bool = False) -> Outcome:
    """Run ``study`` on this machine until its budget is met or ``timeout`` passes.

    ``create``: ``study run`` (create the study if needed, set its budget from ``trials`` or the
    file); else ``study worker`` (join the existing study and its budget).
    """
    section = study.section
    timeout = timeout if timeout is not None else section.timeout
    storage_url = storage_url or section.storage or default_storage_url(study.name)
    claims.claim_lock(storage_url, study.name)  # a storage with no lock for the shared budget is refused here
    checkpoint_dir = Path(section.checkpoint_dir or Path("mlruns") / "checkpoints").resolve()
    probes.probe(checkpoint_dir, "the checkpoint store (study.checkpoint_dir)")  # before anything is written
    if create:
        budget = study_budget(study, trials)
        if budget is None and timeout is None:
            raise SpecError(f"{study.src.path}: no budget: set study.trials or study.timeout, or pass "
                            "--trials/--timeout")
    slots = _slots(study, devices, workers_n or section.resources.workers, trials_per_device)
    # their imports overlap the opening of the study and its MLflow run; no more than the budget can use
    early = workers.Prestarted(slots[:budget] if create and budget is not None else slots)
    try:
        if create:
            joined = record.open_study(study, storage_url, create=True, tracking_uri=tracking_uri, budget=budget)
        else:
            joined = record.open_study(study, storage_url, create=False, tracking_uri=tracking_uri)
            budget = record.budget(joined.ostudy)
        ostudy, mlf = joined.ostudy, joined.mlf
        if joined.lost:
            echo(f"trials {joined.lost} were lost with their worker: marked failed, and retried")
        if joined.retried:
            echo(f"trials {joined.retried} are queued to run again with the same parameters")

        already = claims.counted(ostudy.get_trials(deepcopy=False))
        if budget is not None:
            slots = slots[:max(budget - already, 0)] or []
        deadline = time.time() + timeout if timeout else None
        job = workers.Job(study=study, storage_url=storage_url, tracking_uri=joined.tracking_uri,
                          parent_run_id=joined.parent_run_id, deadline=deadline,
                          checkpoint_dir=str(checkpoint_dir), parent_pid=os.getpid())
        echo(f"study {study.name}: {already} trials so far, budget {budget or 'none'}"
             f"{f', timeout {timeout:g}s' if timeout else ''}; {len(slots)} worker(s) on "
             f"{', '.join(s.device for s in slots) or 'nothing (budget met)'}; storage {redact_url(storage_url)}; "
             f"MLflow {redact_url(joined.tracking_uri)}")
        ran = _supervise(job, slots, ostudy, mlf, budget, echo, live, early)
    finally:
        early.cancel()
    return _finish(study, ostudy, mlf, joined, ran)


def _slots(study: Study, devices: list[int] | None, workers_n: int | None,
           trials_per_device: int | None) -> list[workers.Slot]:
    accelerator = str(study.base.trainer.get("accelerator", "auto"))
    devices = devices or study.section.resources.devices
    gpu_count = 0
    if accelerator != "cpu":
        import torch

        gpu_count = torch.cuda.device_count()
        if devices and any(d >= gpu_count or d < 0 for d in devices):
            raise SpecError(f"devices {devices}: this machine has {gpu_count} visible GPU(s)")
    return workers.plan_slots(accelerator=accelerator, devices=devices, workers=workers_n,
                              trials_per_device=trials_per_device or study.section.resources.trials_per_device,
                              gpu_count=gpu_count, cpu_count=os.cpu_count() or 1)


class ResourceStop(RuntimeError):
    """A worker met a fault that retrying cannot fix (a full disk, a read-only store): the study stopped."""


def _supervise(job, slots, ostudy, mlf, budget, echo, live: bool, early: workers.Prestarted) -> set[str]:
    """Start one process per slot (hand its job to the one started ``early``), replace any that
    dies (its trial is lost, and retried), show progress; returns the ids of the worker processes
    it ran. A stop signal (:class:`Stopped`) or a worker's :class:`ResourceStop` stops them all,
    their trials interrupted."""
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.Process] = {}
    ran: set[str] = set()

    def start(slot):
        def track(p):  # tracked before it runs or gets its job: a stop signal now still finds it
            procs[slot.index] = p

        p = early.start(slot, job, track)
        if p is None:
            p = ctx.Process(target=workers.worker_main, args=(job, slot), name=f"orch-worker-{slot.index}")
            track(p)
            p.start()
        ran.add(claims.worker_id(p.pid))

    last = ""
    crashes = {slot.index: 0 for slot in slots}  # consecutive crashes with no trial finished between
    display = _Display(live)
    try:
        for slot in slots:
            start(slot)
        early.cancel()  # those of slots the budget does not need
        with display:
            while procs:
                for slot in slots:
                    p = procs.get(slot.index)
                    if p is None or p.is_alive():
                        continue
                    p.join()
                    del procs[slot.index]
                    if p.exitcode == workers.RESOURCE_EXIT:
                        raise ResourceStop(f"worker {slot.index} ({slot.device}) met a fault that retrying "
                                           "cannot fix (see its message above)")
                    if p.exitcode == 0:
                        continue
                    lost = claims.fail_orphans(ostudy, dead={claims.worker_id(p.pid)})
                    claims.close_runs(mlf, lost)
                    stopped = p.exitcode in (128 + signal.SIGINT, 128 + signal.SIGTERM)  # preempted on its own
                    crashes[slot.index] = 0 if lost or stopped else crashes[slot.index] + 1
                    give_up = crashes[slot.index] >= 3
                    echo(f"worker {slot.index} ({slot.device}) exited with code {p.exitcode}"
                         + (" (stopped by a signal; its trial is interrupted and retried)" if stopped else "")
                         + (f"; trial(s) {[e.number for e in lost]} lost, to be retried" if lost else "")
                         + ("; it keeps failing before running a trial, so it is not restarted"
                            if give_up else "; restarting it"))
                    if not give_up:
                        start(slot)
                trials = ostudy.get_trials(deepcopy=False)
                best, _ = best_of(ostudy)
                line = _progress(job.study.name, counts_of(trials), budget, best, job.study.section.metric)
                if live:  # every round: running trials move on from epoch to epoch
                    display.update(line, trials, max_epochs(job.study))
                elif line != last:
                    echo(line)
                last = line
                time.sleep(0.5)
    except (stopping.Stopped, ResourceStop) as exc:
        stopping.ignore()  # a second signal must not cut the clean-up short
        signum = exc.signum if isinstance(exc, stopping.Stopped) else signal.SIGTERM
        echo(f"{'a fault that retrying cannot fix' if isinstance(exc, ResourceStop) else exc}: stopping the "
             "workers; their running trials are marked interrupted, and the next run (or any worker of the "
             "study) runs them again")
        _stop_workers(list(procs.values()), signum)
        try:
            # under the claim lock, an ownerless running trial is one a stopped worker had just asked for
            with claims.claim_lock(job.storage_url, job.study.name):
                stopped = claims.fail_orphans(ostudy, interrupted=True, dead={
                claims.worker_id(p.pid) for p in procs.values() if p.pid is not None} | {""})
                others = any(t.state.name == "RUNNING" for t in ostudy.get_trials(deepcopy=False))
            claims.close_runs(mlf, stopped)
            if not others:  # no other process is running trials of the study
                mlf.set_terminated(job.parent_run_id, "KILLED")
        except Exception as again:  # a full or read-only store: the next run finds the trials lost
            if not (isinstance(exc, ResourceStop) and workers.resource_fault(again)):
                raise
        raise
    return ran


def max_epochs(study: Study) -> int | None:
    value = study.base.trainer.get("max_epochs")
    return value if isinstance(value, int) and value > 0 else None


def _stop_workers(procs, signum: int) -> None:
    """Ask every worker to stop (a signal to the group may have reached them already), give them
    the time to close their trials at a step boundary, then kill what is left."""
    for p in procs:
        if p.pid is not None and p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signum)
    deadline = time.time() + stopping.GRACE + 5
    for p in procs:
        if p.pid is None:  # never started
            continue
        p.join(timeout=max(deadline - time.time(), 0.1))
        if p.is_alive():
            p.kill()
            p.join()


class _Display:
    """A live rich table of the trials, or nothing (plain progress lines) when not on a terminal."""

    def __init__(self, live: bool):
        self.live = None
        if live:
            from rich.live import Live

            self.live = Live(refresh_per_second=2, transient=False)

    def __enter__(self):
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.__exit__(*exc)

    def update(self, line: str, trials, max_epochs: int | None) -> None:
        from rich.console import Group

        self.live.update(Group(line, trials_table(trials[-15:], max_epochs=max_epochs)))


def trials_table(trials, reasons: int | None = 60, max_epochs: int | None = None):
    """The trials as a rich table; ``reasons``: characters of a failure's reason to show (``None``:
    all); ``max_epochs``: the study's epochs per trial, for the ETA of running trials."""
    from datetime import datetime

    from rich.table import Table

    table = Table("trial", "state", "value", "epoch", "latest", "params", "duration", "ETA")
    now = datetime.now()
    for t in trials:
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
            t.datetime_start else None
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        reason = t.user_attrs.get(claims.ERROR_ATTR) if t.state.name in ("FAIL", "PRUNED") else None
        epochs = max(t.intermediate_values) + 1 if t.intermediate_values else 0
        latest = t.intermediate_values[epochs - 1] if epochs and epochs - 1 in t.intermediate_values else None
        total = t.params.get("trainer.max_epochs", max_epochs)
        total = total if isinstance(total, int) and total > 0 else None
        eta = "-"
        if t.state.name == "RUNNING" and t.datetime_start:
            duration = (now - t.datetime_start).total_seconds()
            done = epochs - int(t.user_attrs.get("orch.resumed_at_epoch", 0))  # epochs this attempt ran
            if total and done > 0:
                eta = f"{duration / done * max(total - epochs, 0):.0f}s"
        state = state_of(t)
        if reason:  # "interrupted (SIGINT) while running ..." already says its state
            state = reason[:reasons] if reason.startswith(state) else f"{state} ({reason[:reasons]})"
        table.add_row(str(t.number), state,
                      _fmt(t.value) if t.value is not None else "-",
                      f"{epochs}/{total}" if total else str(epochs), _fmt(latest) if latest is not None else "-",
                      params, f"{duration:.1f}s" if duration is not None else "-", eta)
    return table


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _finish(study: Study, ostudy, mlf, joined, ran: set[str] = frozenset()) -> Outcome:
    """Best value and params on the parent run; once no trial is running or waiting (in any process
    of the study), the Optuna plots too, and the parent run ends FINISHED."""
    trials = ostudy.get_trials(deepcopy=False)
    counts = counts_of(trials)
    best_value, best_params = best_of(ostudy)
    parent_id = joined.parent_run_id
    step = len(trials)
    for state, n in counts.items():
        mlf.log_metric(parent_id, f"trials_{state}", n, step=step)
    if best_value is not None and math.isfinite(best_value):
        mlf.log_metric(parent_id, f"best_{study.section.metric}", best_value, step=step)
        best = ostudy.best_trial
        mlf.set_tag(parent_id, "best.trial", str(best.number))
        if best.user_attrs.get(claims.RUN_ATTR):
            mlf.set_tag(parent_id, "best.run_id", best.user_attrs[claims.RUN_ATTR])
        for k, v in best_params.items():
            mlf.set_tag(parent_id, f"best.{k}", str(v))
    if not (counts["running"] or counts["waiting"]):
        _report(study, ostudy, mlf, joined)
        # under the lock: no process joins (and reopens the parent run) between the check and the end
        with claims.claim_lock(joined.storage_url, study.name):
            if not any(t.state.name in ("RUNNING", "WAITING") for t in ostudy.get_trials(deepcopy=False)):
                mlf.set_terminated(parent_id, "FINISHED")
    mine = [t for t in trials if t.user_attrs.get(claims.WORKER_ATTR) in ran and t.state.name != "RUNNING"
            and not claims.retryable(t)]
    failures: dict[str, int] = {}
    for t in mine:
        if t.state.name == "FAIL":
            reason = (t.user_attrs.get(claims.ERROR_ATTR) or "unknown").split(":")[0]
            failures[reason] = failures.get(reason, 0) + 1
    return Outcome(study.name, counts, best_value, best_params, parent_id, [t.number for t in mine], failures)


def _report(study: Study, ostudy, mlf, joined) -> None:
    """The comparison figures and the study report on the parent run (:mod:`orchestrator.report`)."""
    from orchestrator import report

    retrain = None
    try:
        number = ostudy.best_trial.number
    except ValueError:
        number = None
    if number is not None:
        default = joined.storage_url == default_storage_url(study.name)
        retrain = report.retrain_command(study.name, number, None if default else joined.storage_url)
    report.log_to_run(ostudy, mlf, joined.parent_run_id, joined.storage_url, study, retrain)

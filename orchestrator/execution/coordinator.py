"""``orch study run`` and ``orch study worker``: open the study, start the workers, watch them, summarise.

Both commands do the same on their machine: one worker process per device slot, replaced if it
dies, until the study's shared budget is met. ``study run`` may create the study and sets its
budget; ``study worker`` joins a study that exists (on any machine that reaches its storage).
The trials themselves are claimed, run and recorded by the workers (:mod:`orchestrator.execution.workers`).

:func:`run_study` reads as its phases: check the stores, plan the slots and start their workers
early, open the study, supervise the workers (:class:`_Supervisor`), then summarise (:func:`_finish`).
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import object_store, outages, schema
from orchestrator.errors import ResourceFault, SpecError, Stopped, resource_fault
from orchestrator.execution import claims, stopping, workers
from orchestrator.execution.checkpoint_lines import Store
from orchestrator.execution.opening import Joined, open_study
from orchestrator.execution.outcomes import close_runs, counts_of, reconcile, retryable
from orchestrator.execution.slots import slots_for
from orchestrator.report.page import log_to_run
from orchestrator.report.summary import retrain_for
from orchestrator.report.terminal import LiveTable, progress_line
from orchestrator.secrets import redact_url
from orchestrator.spec.space import grid_size
from orchestrator.spec.study import Study
from orchestrator.storage import presence, probes, record
from orchestrator.storage.owners import worker_id
from orchestrator.storage.urls import default_storage_url
from orchestrator.tracking.parent import end_parent, log_progress
from orchestrator.tracking.retrying import RetryingClient, short_http_retries


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
    checkpoint_dir = section.checkpoint_dir or str(Path("mlruns") / "checkpoints")
    if object_store.is_url(checkpoint_dir):  # object storage: reached before anything is written
        object_store.probe(checkpoint_dir, study.name)
    elif checkpoint_dir != schema.MLFLOW_CHECKPOINTS:  # a folder, else the study's MLflow run (its artifacts)
        checkpoint_dir = str(Path(checkpoint_dir).resolve())
        probes.probe(Path(checkpoint_dir), "the checkpoint store (study.checkpoint_dir)")  # before anything is written
    budget = study_budget(study, trials) if create else None
    if create and budget is None and timeout is None:
        raise SpecError(f"{study.src.path}: no budget: set study.trials or study.timeout, or pass --trials/--timeout")
    slots = slots_for(study, devices, workers_n, trials_per_device)
    short_http_retries()  # MLflow's retries take seconds, not minutes: the outage window decides
    # the study's storage, waited for while it is away (the workers decide when an outage is too long)
    db = outages.Outage(f"the Optuna storage {redact_url(storage_url)}", section.outage_grace)
    faults = tempfile.mkdtemp(prefix="orch-faults-")  # where a worker stopped by a fault says why
    # their imports overlap the opening of the study and its MLflow run; no more than the budget can use
    early = workers.Prestarted(slots[:budget] if budget is not None else slots)
    using = contextlib.ExitStack()
    try:
        joined = open_study(study, storage_url, create=create, tracking_uri=tracking_uri, outage=db,
                            **({"budget": budget} if create else {}))
        # once it is open, until the study's end is recorded: no `study repair` rewrites its journal
        using.enter_context(presence.present(storage_url, study.name))
        # the coordinator's MLflow calls wait out an outage too (its own clean-up never waits: no_wait)
        joined.mlf = RetryingClient(joined.mlf, outages.Outage(
            f"the MLflow tracking store {redact_url(joined.tracking_uri)}", section.outage_grace))
        budget = record.budget(joined.ostudy)
        if joined.lost:
            echo(f"trials {joined.lost} were lost with their worker: marked failed, and retried")
        if joined.retried:
            echo(f"trials {joined.retried} are queued to run again with the same parameters")
        already = claims.counted(joined.ostudy.get_trials(deepcopy=False))
        if budget is not None:
            slots = slots[:max(budget - already, 0)]
        job = workers.Job(study=study, storage_url=storage_url, tracking_uri=joined.tracking_uri,
                          parent_run_id=joined.parent_run_id, deadline=time.time() + timeout if timeout else None,
                          checkpoint_dir=checkpoint_dir, parent_pid=os.getpid(), faults=faults)
        echo(f"study {study.name}: {already} trials so far, budget {budget or 'none'}"
             f"{f', timeout {timeout:g}s' if timeout else ''}; {len(slots)} worker(s) on "
             f"{', '.join(s.device for s in slots) or 'nothing (budget met)'}; storage {redact_url(storage_url)}; "
             f"MLflow {redact_url(joined.tracking_uri)}")
        ran = _Supervisor(job, slots, joined, budget, echo, live, early).run()
        early.cancel()  # the workers started early that no slot took
        return _finish(study, joined, ran, checkpoint_dir)
    finally:
        early.cancel()  # (a study that could not be opened, or a stop signal)
        shutil.rmtree(faults, ignore_errors=True)
        using.close()


#: a worker slot whose process died this many times within RESTART_WINDOW seconds is not restarted
MAX_RESTARTS, RESTART_WINDOW = 5, 600.0


class _Supervisor:
    """Starts one process per slot (handing its job to the one started early), replaces any that
    dies (its trial is lost, and retried; at most :data:`MAX_RESTARTS` times in
    :data:`RESTART_WINDOW` seconds per slot), shows progress. A stop signal (:class:`Stopped`) or
    a worker's resource fault (a store away for longer than its window) stops them all, their
    trials interrupted. While the storage is away it waits: progress is shown again when it answers.
    """

    def __init__(self, job: workers.Job, slots, joined: Joined, budget: int | None, echo, live: bool,
                 early: workers.Prestarted):
        self.job, self.slots, self.joined, self.budget = job, slots, joined, budget
        self.echo, self.live, self.early = echo, live, early
        self.procs: dict[int, multiprocessing.Process] = {}
        self.ran: set[str] = set()  # the ids of the worker processes it ran
        self.deaths = {slot.index: collections.deque() for slot in slots}  # when each slot's worker died
        self.display = LiveTable(live)
        self.last = ""

    def run(self) -> set[str]:
        try:
            for slot in self.slots:
                self._start(slot)
            self.early.cancel()  # those of slots the budget does not need
            with self.display:
                while self.procs:
                    for slot in self.slots:
                        self._check(slot)
                    self._show_progress()
                    time.sleep(0.5)
        except BaseException as exc:  # a stop signal, a fault, or a bug here: no worker is left behind
            self._stop_all(exc)
            raise
        return self.ran

    def _start(self, slot) -> None:
        def track(p):  # tracked before it runs or gets its job: a stop signal now still finds it
            self.procs[slot.index] = p

        p = self.early.start(slot, self.job, track)
        if p is None:
            ctx = multiprocessing.get_context("spawn")
            p = ctx.Process(target=workers.worker_main, args=(self.job, slot), name=f"orch-worker-{slot.index}")
            track(p)
            p.start()
        self.ran.add(worker_id(p.pid))

    def _check(self, slot) -> None:
        """A worker that exited: done (0), a fault (stops the study), else replaced, its trial lost
        (unless the slot's workers keep dying: :data:`MAX_RESTARTS`)."""
        p = self.procs.get(slot.index)
        if p is None or p.is_alive():
            return
        p.join()
        del self.procs[slot.index]
        if p.exitcode == workers.RESOURCE_EXIT:
            raise ResourceFault(self._fault_of(p, slot))
        if p.exitcode == 0:
            return
        try:
            with outages.no_wait():  # the storage away: the next claim of any worker finds the trial lost
                lost = claims.fail_orphans(self.joined.ostudy, dead={worker_id(p.pid)})
                close_runs(self.joined.mlf, lost)
        except outages.Unavailable:
            lost = []
        stopped = p.exitcode in (128 + signal.SIGINT, 128 + signal.SIGTERM)  # preempted on its own
        deaths, now = self.deaths[slot.index], time.monotonic()
        deaths.append(now)
        while deaths and now - deaths[0] > RESTART_WINDOW:
            deaths.popleft()
        give_up = len(deaths) >= MAX_RESTARTS
        retried = [e.number for e in lost if e.retried]
        dropped = [e.number for e in lost if not e.retried and e.state != "failed"]
        failed = [e.number for e in lost if e.state == "failed"]
        self.echo(f"worker {slot.index} ({slot.device}) exited with code {p.exitcode}"
                  + (" (stopped by a signal; its trial is interrupted and retried)" if stopped else "")
                  + (f"; trial(s) {retried} lost, to be retried" if retried else "")
                  + (f"; trial(s) {dropped} lost before drawing parameters (no budget used, nothing to retry)"
                     if dropped else "")
                  + (f"; trial(s) {failed} lost for the last time, counted as failed" if failed else "")
                  + (f"; its workers died {len(deaths)} times in {RESTART_WINDOW / 60:g} minutes, so it is not "
                     "restarted" if give_up else "; restarting it"))
        if not give_up:
            self._start(slot)

    def _fault_of(self, p, slot) -> str:
        """The one line worker ``p`` wrote when a fault stopped it."""
        try:
            with open(workers.fault_file(self.job.faults, p.pid)) as f:
                return f.read(2000).strip()
        except (OSError, TypeError):
            return f"worker {slot.index} ({slot.device}) met a fault that retrying cannot fix (see its message above)"

    def _show_progress(self) -> None:
        ostudy, study = self.joined.ostudy, self.job.study
        try:
            with outages.no_wait():
                trials = ostudy.get_trials(deepcopy=False)
                best = _best_value(ostudy)
        except outages.Unavailable:
            return  # shown again when the storage answers
        line = progress_line(study.name, counts_of(trials), self.budget, best, study.section.metric)
        if self.live:  # every round: running trials move on from epoch to epoch
            self.display.update(line, trials, study.max_epochs)
        elif line != self.last:
            self.echo(line)
        self.last = line

    def _stop_all(self, exc: BaseException) -> None:
        """Stop every worker, then end their running trials interrupted (and the parent run, if no
        other process of the study runs trials)."""
        stopping.ignore()  # a second signal must not cut the clean-up short
        self.echo(f"{exc if isinstance(exc, Stopped) else 'a fault (below)'}: stopping the workers; their running "
                  "trials are marked interrupted, and the next run (or any worker of the study) runs them again")
        _stop_workers(list(self.procs.values()), exc.signum if isinstance(exc, Stopped) else signal.SIGTERM)
        ostudy, job = self.joined.ostudy, self.job
        try:
            # under the claim lock, an ownerless running trial is one a stopped worker had just asked for
            with outages.no_wait():
                with claims.claim_lock(job.storage_url, job.study.name):
                    stopped = claims.fail_orphans(ostudy, interrupted=True, dead=self.ran | {
                        worker_id(p.pid) for p in self.procs.values() if p.pid is not None} | {""})
                    others = any(t.state.name == "RUNNING" for t in ostudy.get_trials(deepcopy=False))
                close_runs(self.joined.mlf, stopped)
                if not others:  # no other process is running trials of the study
                    end_parent(self.joined.mlf, job.parent_run_id, finished=False)
        except Exception as again:  # a full, read-only or absent store: the next run finds the trials lost
            if not (resource_fault(again) or outages.connection_problem(again)) or not isinstance(
                    exc, (Stopped, ResourceFault)):
                raise


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


def _best_value(ostudy) -> float | None:
    try:
        return ostudy.best_trial.value
    except ValueError:
        return None


def _finish(study: Study, joined: Joined, ran: set[str] = frozenset(), checkpoint_dir: str | None = None) -> Outcome:
    """Counts and best trial on the parent run; once no trial is running or waiting (in any process
    of the study), the figures and the report too, and the parent run ends FINISHED."""
    ostudy, mlf, parent_id = joined.ostudy, joined.mlf, joined.parent_run_id
    with contextlib.suppress(Exception):  # runs a store outage left RUNNING; the next run tries again
        reconcile(ostudy, mlf, study.name)
    with contextlib.suppress(Exception):  # lines that ended (lost for the last time too): nothing resumes from them
        Store(checkpoint_dir, study.name, mlf, parent_id, joined.tracking_uri).collect(
            lambda: ostudy.get_trials(deepcopy=False))
    trials = ostudy.get_trials(deepcopy=False)
    counts = counts_of(trials)
    log_progress(mlf, parent_id, ostudy, counts, study.section.metric, step=len(trials))
    if not (counts["running"] or counts["waiting"]):
        log_to_run(ostudy, mlf, parent_id, joined.storage_url, study, retrain_for(ostudy, joined.storage_url))
        # under the lock: no process joins (and reopens the parent run) between the check and the end
        with claims.claim_lock(joined.storage_url, study.name):
            if not any(t.state.name in ("RUNNING", "WAITING") for t in ostudy.get_trials(deepcopy=False)):
                end_parent(mlf, parent_id, finished=True)
    mine = [t for t in trials if t.user_attrs.get(schema.WORKER) in ran and t.state.name != "RUNNING"
            and not retryable(t)]
    failures: dict[str, int] = {}
    for t in mine:
        if t.state.name == "FAIL":
            reason = (t.user_attrs.get(schema.ERROR) or "unknown").split(":")[0]
            failures[reason] = failures.get(reason, 0) + 1
    try:
        best_value, best_params = ostudy.best_trial.value, ostudy.best_trial.params
    except ValueError:
        best_value, best_params = None, {}
    return Outcome(study.name, counts, best_value, best_params, parent_id, [t.number for t in mine], failures)

"""Worker processes: one per device slot, each pulling the next trial as soon as it is free.

A worker pins its device (``CUDA_VISIBLE_DEVICES``) and its torch threads before torch is
imported, then loops: claim a trial under a lock (so that the budget shared by all workers,
on this machine and others, is never overshot), sample its parameters, run it inside its own
MLflow child run (:mod:`orchestrator.execution.trial`), and tell Optuna the outcome. Optuna and
MLflow always end in the same state: complete, pruned (the pruner, or a per-epoch report), failed
(with the reason), or interrupted (a stop signal, a full disk: retried, no budget used).

Both stores are reached through proxies that wait out their outages
(:mod:`orchestrator.outages`): a database restart or a tracking server away for minutes costs
the trials nothing. A store away for longer than ``study.outage_grace`` stops the worker with
:data:`RESOURCE_EXIT`, its one-line reason written for the coordinator (``Job.faults``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import warnings
from dataclasses import dataclass

from orchestrator import outages, secrets
from orchestrator.errors import ResourceFault
from orchestrator.execution import stopping
from orchestrator.execution.claims import claim, claim_lock, reap_stale
from orchestrator.execution.lease import Lease
from orchestrator.execution.slots import Slot
from orchestrator.execution.trial import run_trial
from orchestrator.secrets import redact, redact_url
from orchestrator.spec.samplers import make_pruner, make_sampler
from orchestrator.storage import record
from orchestrator.storage.backends import open_storage
from orchestrator.storage.retrying import retrying
from orchestrator.tracking import client
from orchestrator.tracking.retrying import RetryingClient, short_http_retries
from orchestrator.training.quiet import quiet_lightning

#: exit code of a worker stopped by a :class:`~orchestrator.errors.ResourceFault` (EX_TEMPFAIL)
RESOURCE_EXIT = 75


@dataclass
class Job:
    """Everything a worker process needs (picklable: sent to spawned processes). The budget is
    not here: it is the study's, read from the storage at every claim."""

    study: object  # orchestrator.spec.study.Study
    storage_url: str
    tracking_uri: str
    parent_run_id: str
    deadline: float | None
    checkpoint_dir: str  # the root of the checkpoint store (orchestrator.training.checkpoints)
    parent_pid: int  # the coordinator: a worker stops when it is gone
    faults: str | None = None  # a private folder where a worker stopped by a fault writes why, for the coordinator


def fault_file(faults: str, pid: int) -> str:
    """Where worker ``pid`` writes the one line that says why it stopped the study."""
    return os.path.join(faults, f"worker-{pid}.fault")


class Prestarted:
    """Worker processes started as soon as the study file is checked, one per slot: each imports
    torch, Lightning, MLflow and Optuna while the coordinator opens the study and its MLflow run,
    then waits for its :class:`Job` (:func:`early_main`). :meth:`start` hands a slot its job;
    :meth:`cancel` kills those never handed one, which have touched nothing but their imports."""

    def __init__(self, slots: list[Slot]):
        ctx = multiprocessing.get_context("spawn")
        self.waiting: dict[int, tuple] = {}
        try:
            for slot in slots:
                receive, send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=early_main, args=(receive, slot, os.getpid()), name=f"orch-worker-{slot.index}")
                self.waiting[slot.index] = (p, send)  # tracked before it runs, so cancel() finds it
                p.start()
                receive.close()
        except BaseException:
            self.cancel()
            raise

    def start(self, slot: Slot, job: Job, track):
        """The worker process of ``slot``, given ``track`` and then ``job`` (``None`` if none was
        started early for it)."""
        entry = self.waiting.get(slot.index)
        if entry is None:
            return None
        p, send = entry
        track(p)
        del self.waiting[slot.index]
        try:
            send.send(job)
        except OSError:
            pass  # it died meanwhile: the coordinator sees a worker that exited, and replaces it
        finally:
            send.close()
        return p

    def cancel(self) -> None:
        """Kill and reap every worker still waiting for a job."""
        for p, send in self.waiting.values():
            send.close()
            if p.pid is not None:
                p.kill()
                p.join()
        self.waiting.clear()


def worker_main(job: Job, slot: Slot) -> None:
    """Entry point of a worker process (started with the ``spawn`` method)."""
    _prepare(slot, job.parent_pid)
    _work(job, slot)


def early_main(jobs, slot: Slot, parent_pid: int) -> None:
    """Entry point of a worker started while the coordinator still opens the study: its imports
    (torch, Lightning, MLflow, Optuna: seconds) overlap the coordinator's, then it waits for its
    job on the pipe ``jobs``. It touches no storage before the job comes; no job (the pipe closed:
    the study did not open, or needs fewer workers) and it exits."""
    _prepare(slot, parent_pid)
    while not jobs.poll(0.2):
        if stopping.requested() is not None:
            sys.exit(stopping.exit_code())
    try:
        job = jobs.recv()
    except (EOFError, OSError):  # no job: the coordinator closed the pipe, or died mid-message
        return
    finally:
        jobs.close()
    _work(job, slot)


def _prepare(slot: Slot, parent_pid: int) -> None:
    """Stop handlers, the slot's device and threads, then the heavy imports, once per process."""
    stopping.install_worker_handlers(parent_pid)
    # pin the device before anything can initialise CUDA; slot.gpu indexes the GPUs the
    # coordinator could see, which may themselves be a CUDA_VISIBLE_DEVICES selection
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if slot.gpu is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[slot.gpu] if visible else str(slot.gpu)
    os.environ.setdefault("OMP_NUM_THREADS", str(slot.threads))
    import mlflow  # noqa: F401 - imported here, once, so that a worker started early has paid for it
    import optuna
    import pytorch_lightning  # noqa: F401 - sets its logger's level on import; quieten it after
    import torch

    torch.set_num_threads(slot.threads)
    quiet_lightning(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _work(job: Job, slot: Slot) -> None:
    """Claim and run trials until the budget is met, the deadline passes or a stop is requested."""
    secrets.remember(job.storage_url)  # hidden from this process's messages and tracebacks too
    secrets.remember(job.tracking_uri)
    short_http_retries()
    window = job.study.section.outage_grace

    def stop() -> bool:
        return stopping.requested() is not None

    db = outages.Outage(f"the Optuna storage {redact_url(job.storage_url)}", window, stop=stop)
    tracking = outages.Outage(f"the MLflow tracking store {redact_url(job.tracking_uri)}", window, stop=stop)
    outages.watch(db, tracking)
    try:
        _claim_and_run(job, slot, db, tracking)
    except ResourceFault as exc:  # a full disk, a store away for longer than its window
        _report_fault(job, exc)
        sys.exit(RESOURCE_EXIT)
    except outages.Unavailable:  # asked to stop while a store was away: the coordinator ends its trial
        if stopping.requested() is None:
            raise
    if stopping.requested() is not None:
        sys.exit(stopping.exit_code())


def _claim_and_run(job: Job, slot: Slot, db, tracking) -> None:
    import optuna

    section = job.study.section
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

    def load():
        storage = optuna.storages.get_storage(open_storage(job.storage_url, section.heartbeat))
        return optuna.load_study(study_name=job.study.name, storage=retrying(storage, db),
                                 pruner=make_pruner(section, job.study.base.trainer.get("max_epochs")))

    ostudy = db.call(load)
    mlf = RetryingClient(tracking.call(client.client, job.tracking_uri), tracking)
    lock = claim_lock(job.storage_url, job.study.name)

    def offset_of():
        with lock:
            return record.next_sampler_offset(ostudy)

    offset = db.call(offset_of)
    ostudy.sampler = make_sampler(section, offset=offset)
    poll = min(2.0, float(section.heartbeat.interval))
    reaper_lock = claim_lock(job.storage_url, job.study.name)  # the heartbeat thread's own connection
    while stopping.requested() is None:
        trial = claim(ostudy, lock, job.deadline, mlf, poll=poll, stop=stopping.requested, outage=db)
        if trial is None:
            break
        # RDB storages: alive, for the workers of other machines; stale trials reaped meanwhile
        with Lease(ostudy, trial, reap=lambda: reap_stale(ostudy, reaper_lock, mlf), outage=db):
            run_trial(job, ostudy, trial, mlf, slot, offset)


def _report_fault(job: Job, exc: BaseException) -> None:
    """The one line that says why this worker stops the study: for the coordinator to print (in a
    file of its private folder, created here, never through a link), else on stderr."""
    line = redact(str(exc))
    if job.faults:
        try:
            fd = os.open(fault_file(job.faults, os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o600)
            with os.fdopen(fd, "w") as f:
                f.write(line)
            return
        except OSError:
            pass
    print(f"orch worker: {line}; the study stops", file=sys.stderr, flush=True)

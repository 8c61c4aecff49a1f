"""Trial workers: one process per device slot, each pulling the next trial as soon as it is free.

A worker pins its device (``CUDA_VISIBLE_DEVICES``) and its torch threads before torch is
imported, then loops: claim a trial under a lock (so that the budget shared by all workers,
on this machine and others, is never overshot), sample its parameters, run it inside its own
MLflow child run, and tell Optuna the outcome. Optuna and MLflow always end in the same state:
complete, pruned (the pruner, or a per-epoch report), failed (with the reason), or interrupted
(a stop signal, a full disk: retried, no budget used).
"""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass

from orchestrator.claims import (ERROR_ATTR, INTERRUPTED_ATTR, LINEAGE_ATTR, RETRY_ATTR, RUN_ATTR, claim,
                                 claim_lock, worker_id)
from orchestrator.secrets import redact


@dataclass(frozen=True)
class Slot:
    """Where one worker runs: a GPU id (``None`` for CPU) and its torch threads."""

    index: int
    gpu: int | None
    threads: int

    @property
    def device(self) -> str:
        return f"cuda:{self.gpu}" if self.gpu is not None else "cpu"


def plan_slots(*, accelerator: str, devices: list[int] | None, workers: int | None,
               trials_per_device: int, gpu_count: int, cpu_count: int) -> list[Slot]:
    """The worker slots: ``trials_per_device`` per GPU (all visible ones unless ``devices``), else CPU slots."""
    use_gpu = accelerator not in ("cpu",) and (devices or gpu_count)
    if use_gpu:
        ids = devices if devices else list(range(gpu_count))
        per = max(1, cpu_count // (len(ids) * trials_per_device))
        return [Slot(i, gpu, per) for i, gpu in enumerate(g for g in ids for _ in range(trials_per_device))]
    n = workers or 1
    return [Slot(i, None, max(1, cpu_count // n)) for i in range(n)]


@dataclass
class Job:
    """Everything a worker process needs (picklable: sent to spawned processes). The budget is
    not here: it is the study's, read from the storage at every claim."""

    study: object  # orchestrator.study.Study
    storage_url: str
    tracking_uri: str
    parent_run_id: str
    deadline: float | None
    checkpoint_dir: str  # the root of the checkpoint store (orchestrator.checkpoints)
    parent_pid: int  # the coordinator: a worker stops when it is gone


# ---- one trial ---------------------------------------------------------------------------------
def pruning_callback(trial, metric: str):
    """A Lightning callback reporting ``metric`` after each validation and pruning when told to."""
    import optuna
    import pytorch_lightning as pl

    class Pruning(pl.Callback):
        def on_validation_end(self, trainer, module):
            if trainer.sanity_checking or metric not in trainer.callback_metrics:
                return
            value = float(trainer.callback_metrics[metric])
            trial.report(value, trainer.current_epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {trainer.current_epoch} with {metric}={value:.6g}")

    return Pruning()


def run_trial(job: Job, ostudy, trial, mlf, slot: Slot, stream: int = 0) -> str:
    """Run one claimed trial to its end in Optuna and MLflow; returns the state it ended in.

    A retried trial (``orch.retry_of``) continues from the last checkpoint of its lineage, if the
    checkpoint store has one, with the earlier epochs' metrics copied to its MLflow run and
    reported to Optuna again.
    """
    import optuna

    from orchestrator import checkpoints, runner, stopping, views
    from orchestrator.config import SpecError
    from orchestrator.contracts.module import NonFiniteLossError
    from orchestrator.study import suggest

    section = job.study.section
    tags = {"orch.study": job.study.name, "orch.trial": str(trial.number), "orch.role": "trial",
            "orch.worker": worker_id(), "orch.slot": slot.device, "orch.stream": str(stream)}
    retry_of = trial.user_attrs.get(RETRY_ATTR)
    lineage = trial.user_attrs.get(LINEAGE_ATTR, trial.number)
    if retry_of is not None:
        tags[RETRY_ATTR] = str(retry_of)
    folder = checkpoints.folder(job.checkpoint_dir, job.study.name, lineage)
    run_id = runner.start_run(mlf, job.study.name, run_name=f"trial-{trial.number}",
                              parent_run_id=job.parent_run_id, tags=tags)
    trial.set_user_attr(RUN_ATTR, run_id)
    trial.set_user_attr("orch.device", slot.device)
    try:
        params = suggest(trial, section, job.study.data)
        mlf.update_run(run_id, name=views.run_name(trial.number, params))
        spec = job.study.spec_for(params)
        key = checkpoints.fingerprint(ostudy._study_id, lineage, params)
        resume_at = None
        if retry_of is None:
            checkpoints.remove(folder)  # a new line: nothing of another study's trial of this number
        else:
            resume_at = checkpoints.resume_epoch(folder, key)
        if resume_at is not None:
            mlf.set_tag(run_id, "orch.resumed_at_epoch", str(resume_at))
            trial.set_user_attr("orch.resumed_at_epoch", resume_at)  # for the live table's ETA
            _carry_over(ostudy, trial, mlf, run_id, resume_at)
        overrides = {"accelerator": "gpu", "devices": 1} if slot.gpu is not None else {"accelerator": "cpu"}
        overrides["enable_progress_bar"] = False
        mode = "min" if section.direction == "minimize" else "max"
        result = runner.tracked_fit(spec, mlf, run_id,
                                    callbacks=[pruning_callback(trial, section.metric), stopping.callback()],
                                    checkpoint=(section.metric, mode) if section.checkpoint else None,
                                    ckpt_dir=folder, ckpt_key=key,
                                    resume=folder / checkpoints.LAST if resume_at else None,
                                    **overrides)
        value = result.metrics.get(section.metric)
        if value is None:
            raise RuntimeError(f"the run did not log {section.metric!r}; it logged: "
                               f"{', '.join(sorted(result.metrics)) or 'nothing'}")
        if not math.isfinite(value):
            raise NonFiniteLossError(f"{section.metric} is {value}")
    except optuna.TrialPruned as exc:
        state = _conclude(ostudy, trial, mlf, run_id, "pruned", error=str(exc))
    except (Exception, KeyboardInterrupt, SystemExit) as exc:
        # a stop signal (the flag, Lightning's SIGTERMException, a KeyboardInterrupt) interrupts
        # the trial: it is retried and uses no budget; a resource that retrying cannot fix
        # (a full disk, a read-only store) interrupts it too, and stops the study
        fatal = resource_fault(exc)
        interrupted = stopping.requested() is not None or isinstance(exc, KeyboardInterrupt) or fatal
        if interrupted:
            reason = (f"interrupted: {fatal}" if fatal else
                      f"interrupted ({signal.Signals(stopping.requested() or signal.SIGINT).name}) while running; "
                      "it is retried with the same parameters, from its last checkpoint")
            attrs = {ERROR_ATTR: redact(reason)[:2000], INTERRUPTED_ATTR: True}
            state = "interrupted"
            try:
                state = _conclude(ostudy, trial, mlf, run_id, "interrupted", error=reason, attrs=attrs)
            except Exception as again:  # noqa: BLE001 - the store itself is full or read-only:
                if not resource_fault(again):  # the trial stays RUNNING, and the next run finds
                    raise  # it lost, in Optuna and MLflow alike
            if fatal:
                raise ResourceFault(fatal) from exc
            return state
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        reason = exc.detail if isinstance(exc, SpecError) else f"{type(exc).__name__}: {exc}"
        state = _conclude(ostudy, trial, mlf, run_id, "failed", error=exc, attrs={ERROR_ATTR: redact(reason)[:2000]})
    else:
        mlf.log_metric(run_id, "objective", value)
        state = _conclude(ostudy, trial, mlf, run_id, "complete", value=value)
    if state in ("complete", "pruned", "failed"):
        checkpoints.remove(folder)  # the best checkpoint is in MLflow; nothing is left to resume
    return state


def _carry_over(ostudy, trial, mlf, run_id: str, resume_at: int) -> None:
    """Give a resumed trial the epochs it does not run again, from the earlier tries of its line
    (newest first, so that a try that died before copying its own history is made up for): their
    MLflow metrics and their reports to Optuna."""
    from orchestrator import checkpoints

    tries, number = [], trial.user_attrs.get(RETRY_ATTR)
    while number is not None:
        earlier = ostudy._storage.get_trial(ostudy._storage.get_trial_id_from_study_id_trial_number(
            ostudy._study_id, number))
        tries.append(earlier)
        number = earlier.user_attrs.get(RETRY_ATTR)
    checkpoints.copy_history(mlf, [t.user_attrs[RUN_ATTR] for t in tries if t.user_attrs.get(RUN_ATTR)], run_id,
                             resume_at)
    reports: dict[int, float] = {}
    for t in tries:
        for step, value in t.intermediate_values.items():
            reports.setdefault(step, value)
    for step in sorted(s for s in reports if s < resume_at):
        trial.report(reports[step], step)


class ResourceFault(RuntimeError):
    """A fault that retrying cannot fix (disk full, read-only or unwritable store): the study stops."""


#: exit code of a worker stopped by a :class:`ResourceFault` (EX_TEMPFAIL)
RESOURCE_EXIT = 75
_RESOURCE_ERRNOS = {"ENOSPC": "no space left on the device", "EDQUOT": "disk quota exceeded",
                    "EROFS": "read-only file system", "EFBIG": "file too large (a file-size limit)",
                    "EACCES": "permission denied"}
_RESOURCE_TEXT = {"database or disk is full": "disk full (database)", "disk I/O error": "disk I/O error",
                  "attempt to write a readonly database": "read-only database",
                  "No space left on device": "no space left on the device"}


def resource_fault(exc: BaseException) -> str | None:
    """What in ``exc`` (or what caused it) is a fault that retrying cannot fix, or ``None``."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = getattr(exc, "errno", None)
        for name, what in _RESOURCE_ERRNOS.items():
            if code == getattr(errno, name, None):
                where = getattr(exc, "filename", None)
                return f"{what}{f' ({where})' if where else ''}"
        text = str(exc)
        for needle, what in _RESOURCE_TEXT.items():
            if needle in text:
                return what
        exc = exc.__cause__ or exc.__context__
    return None


def _conclude(ostudy, trial, mlf, run_id: str, state: str, *, value: float | None = None, error=None,
              attrs: dict | None = None) -> str:
    """Close the trial's MLflow run with ``state``, then tell Optuna; returns the state it ended in.

    MLflow is closed first: should the process die in between, the trial is still RUNNING in
    Optuna, and is found lost and failed in both. A trial that another process declared lost
    meanwhile (its heartbeats stalled past the grace period, and a retry is queued) keeps that
    verdict: its MLflow run ends as lost, as it is in Optuna, and ``"lost"`` is returned.
    """
    import optuna

    from orchestrator import runner

    if not _taken_over(ostudy, trial, mlf, run_id):
        try:
            for key, v in (attrs or {}).items():
                trial.set_user_attr(key, v)
            runner.end_run(mlf, run_id, state, error)
            if state == "complete":
                ostudy.tell(trial, value)
            else:
                ostudy.tell(trial, state=optuna.trial.TrialState.PRUNED if state == "pruned" else
                            optuna.trial.TrialState.FAIL)
            return state
        except Exception:  # finished by another process between the check and the tell?
            if not _taken_over(ostudy, trial, mlf, run_id):
                raise
    return "lost"


def _taken_over(ostudy, trial, mlf, run_id: str) -> bool:
    """Whether the trial was already finished by another process (declared lost); if so its MLflow
    run is closed as lost, as the trial is in Optuna."""
    from orchestrator import runner

    if ostudy._storage.get_trial(trial._trial_id).state.name == "RUNNING":
        return False
    runner.end_run(mlf, run_id, "lost", "lost: declared lost while it was still running (its heartbeat "
                   "stalled past the grace period); a retry replaces it")
    return True


class Prestarted:
    """Worker processes started as soon as the study file is checked, one per slot: each imports
    torch, Lightning, MLflow and Optuna while the coordinator opens the study and its MLflow run,
    then waits for its :class:`Job` (:func:`early_main`). :meth:`start` hands a slot its job;
    :meth:`cancel` kills those never handed one, which have touched nothing but their imports."""

    def __init__(self, slots: list[Slot]):
        import multiprocessing

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


# ---- the worker process ------------------------------------------------------------------------
def worker_main(job: Job, slot: Slot) -> None:
    """Entry point of a worker process (started with the ``spawn`` method)."""
    _prepare(slot, job.parent_pid)
    _work(job, slot)


def early_main(jobs, slot: Slot, parent_pid: int) -> None:
    """Entry point of a worker started while the coordinator still opens the study: its imports
    (torch, Lightning, MLflow, Optuna: seconds) overlap the coordinator's, then it waits for its
    job on the pipe ``jobs``. It touches no storage before the job comes; no job (the pipe closed:
    the study did not open, or needs fewer workers) and it exits."""
    from orchestrator import stopping

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
    from orchestrator import stopping

    stopping.install_worker_handlers(parent_pid)
    # pin the device before anything can initialise CUDA; slot.gpu indexes the GPUs the
    # coordinator could see, which may themselves be a CUDA_VISIBLE_DEVICES selection
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if slot.gpu is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[slot.gpu] if visible else str(slot.gpu)
    os.environ.setdefault("OMP_NUM_THREADS", str(slot.threads))
    import logging
    import warnings

    import mlflow  # noqa: F401 - imported here, once, so that a worker started early has paid for it
    import optuna
    import pytorch_lightning  # noqa: F401 - sets its logger's level on import; quieten it after
    import torch

    torch.set_num_threads(slot.threads)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _work(job: Job, slot: Slot) -> None:
    """Claim and run trials until the budget is met, the deadline passes or a stop is requested."""
    import warnings

    import optuna

    from orchestrator import record, secrets, stopping, tracking
    from orchestrator.claims import Heartbeat
    from orchestrator.study import make_pruner, make_sampler, open_storage

    secrets.remember(job.storage_url)  # hidden from this process's messages and tracebacks too
    secrets.remember(job.tracking_uri)

    section = job.study.section
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    ostudy = optuna.load_study(study_name=job.study.name, storage=open_storage(job.storage_url, section.heartbeat),
                               pruner=make_pruner(section, job.study.base.trainer.get("max_epochs")))
    mlf = tracking.client(job.tracking_uri)
    lock = claim_lock(job.storage_url, job.study.name)
    with lock:
        stream = record.next_stream(ostudy)
    ostudy.sampler = make_sampler(section, stream=stream)
    poll = min(2.0, float(section.heartbeat.interval))
    while stopping.requested() is None:
        trial = claim(ostudy, lock, job.deadline, mlf, poll=poll, stop=stopping.requested)
        if trial is None:
            break
        try:
            with Heartbeat(ostudy, trial):  # RDB storages: alive, for the workers of other machines
                run_trial(job, ostudy, trial, mlf, slot, stream)
        except ResourceFault as exc:
            print(f"orch worker: {exc}; the study stops", file=sys.stderr, flush=True)
            sys.exit(RESOURCE_EXIT)
    if stopping.requested() is not None:
        sys.exit(stopping.exit_code())

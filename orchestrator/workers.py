"""Trial workers: one process per device slot, each pulling the next trial as soon as it is free.

A worker pins its device (``CUDA_VISIBLE_DEVICES``) and its torch threads before torch is
imported, then loops: claim a trial under a lock (so that the budget shared by all workers,
on this machine and others, is never overshot), sample its parameters, run it inside its own
MLflow child run, and tell Optuna the outcome. Optuna and MLflow always end in the same state:
complete, pruned (the pruner, or a per-epoch report), or failed (with the reason).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import time
from dataclasses import dataclass

#: a trial's user attributes that tie it to its worker and its MLflow run
WORKER_ATTR = "orch.worker"
RUN_ATTR = "orch.mlflow_run_id"
ERROR_ATTR = "orch.error"
#: set on a trial stopped by the user (Ctrl-C): it uses no budget and is retried by the next run
INTERRUPTED_ATTR = "orch.interrupted"
#: on a retry, the number of the interrupted trial it repeats
RETRY_ATTR = "orch.retry_of"


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
    """Everything a worker process needs (picklable: sent to spawned processes)."""

    study: object  # orchestrator.study.Study
    storage_url: str
    tracking_uri: str
    parent_run_id: str
    budget: int | None
    deadline: float | None
    seed_offset: int


# ---- claiming trials ---------------------------------------------------------------------------
def claim_lock(storage_url: str):
    """A lock that makes "count the trials, then ask for one" atomic across workers."""
    from filelock import FileLock

    if storage_url.startswith("journal:"):
        path = os.path.abspath(os.path.expanduser(storage_url[len("journal:"):]))
        return FileLock(path + ".claim.lock")
    if storage_url.startswith("sqlite:///"):
        return FileLock(os.path.abspath(storage_url[len("sqlite:///"):]) + ".claim.lock")
    dialect = storage_url.split(":", 1)[0].split("+", 1)[0]
    if dialect not in _AdvisoryLock.SQL:
        from orchestrator.config import SpecError
        from orchestrator.tracking import redact

        raise SpecError(f"storage {redact(storage_url)}: workers share the budget through a lock, which orch "
                        f"has for journal files, SQLite, PostgreSQL and MySQL, not for {dialect!r}")
    return _AdvisoryLock(storage_url, dialect)


class _AdvisoryLock:
    """A PostgreSQL advisory lock, for workers on several machines sharing one RDB storage."""

    #: (lock, unlock) statements per dialect; a lock is released too when its connection closes
    SQL = {"postgresql": ("SELECT pg_advisory_lock(1869767528)", "SELECT pg_advisory_unlock(1869767528)"),
           "mysql": ("SELECT GET_LOCK('orch.claim', -1)", "SELECT RELEASE_LOCK('orch.claim')")}

    def __init__(self, url: str, dialect: str):
        self.url = url
        self.lock_sql, self.unlock_sql = self.SQL[dialect]
        self._engine = None
        self._conn = None

    def __enter__(self):
        import sqlalchemy

        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
        self._conn = self._engine.connect()
        self._conn.execute(sqlalchemy.text(self.lock_sql))
        return self

    def __exit__(self, *exc):
        import sqlalchemy

        try:
            self._conn.execute(sqlalchemy.text(self.unlock_sql))
        finally:
            self._conn.close()


def counted(trials) -> int:
    """Trials that use up budget: all but those waiting to be picked up and those the user interrupted."""
    from optuna.trial import TrialState

    return sum(1 for t in trials if t.state != TrialState.WAITING and not t.user_attrs.get(INTERRUPTED_ATTR))


def requeue_interrupted(ostudy) -> list[int]:
    """Queue one retry, with the same parameters, of each trial that a Ctrl-C stopped.

    Call it under the claim lock. The retry is an ordinary WAITING trial: the next worker to ask
    for a trial gets it, and it uses the budget like any other.
    """
    from optuna.trial import TrialState, create_trial

    trials = ostudy.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_ATTR) for t in trials}
    queued = []
    for t in trials:
        if t.state != TrialState.FAIL or not t.user_attrs.get(INTERRUPTED_ATTR) or t.number in retried:
            continue
        grid = {k: t.system_attrs[k] for k in ("grid_id", "search_space") if k in t.system_attrs}
        if grid:  # a grid point (its params may be partial if the stop came mid-sampling): same grid id
            ostudy.add_trial(create_trial(state=TrialState.WAITING, system_attrs=grid,
                                          user_attrs={RETRY_ATTR: t.number}))
        else:  # the params it had; any it had not sampled yet are sampled afresh
            ostudy.enqueue_trial(t.params, user_attrs={RETRY_ATTR: t.number})
        queued.append(t.number)
    return queued


def claim(ostudy, budget: int | None, lock, deadline: float | None, mlf=None):
    """The next trial, or ``None`` when the budget is used up or the deadline has passed.

    With an RDB storage (several machines), trials whose heartbeat stopped (a lost node) are
    failed first, in Optuna and MLflow, so that they neither hang nor block the budget.
    """
    if deadline is not None and time.time() >= deadline:
        return None
    with lock:
        if mlf is not None:
            fail_stale(ostudy, mlf)
        if budget is not None and counted(ostudy.get_trials(deepcopy=False)) >= budget:
            return None
        trial = ostudy.ask()
        trial.set_user_attr(WORKER_ATTR, worker_id())
        return trial


def worker_id(pid: int | None = None) -> str:
    return f"{socket.gethostname()}:{pid or os.getpid()}"


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


def run_trial(job: Job, ostudy, trial, mlf, slot: Slot) -> str:
    """Run one claimed trial to its end in Optuna and MLflow; returns its state."""
    import optuna

    from orchestrator import runner
    from orchestrator.config import SpecError
    from orchestrator.contracts.module import NonFiniteLossError
    from orchestrator.study import suggest

    section = job.study.section
    tags = {"orch.study": job.study.name, "orch.trial": str(trial.number), "orch.role": "trial",
            "orch.worker": worker_id(), "orch.slot": slot.device}
    if RETRY_ATTR in trial.user_attrs:
        tags[RETRY_ATTR] = str(trial.user_attrs[RETRY_ATTR])
    run_id = runner.start_run(mlf, job.study.name, run_name=f"trial-{trial.number}",
                              parent_run_id=job.parent_run_id, tags=tags)
    trial.set_user_attr(RUN_ATTR, run_id)
    trial.set_user_attr("orch.device", slot.device)
    try:
        params = suggest(trial, section, job.study.data)
        spec = job.study.spec_for(params)
        overrides = {"accelerator": "gpu", "devices": 1} if slot.gpu is not None else {"accelerator": "cpu"}
        overrides["enable_progress_bar"] = False
        mode = "min" if section.direction == "minimize" else "max"
        result = runner.tracked_fit(spec, mlf, run_id, callbacks=[pruning_callback(trial, section.metric)],
                                    checkpoint=(section.metric, mode) if section.checkpoint else None,
                                    **overrides)
        value = result.metrics.get(section.metric)
        if value is None:
            raise RuntimeError(f"the run did not log {section.metric!r}; it logged: "
                               f"{', '.join(sorted(result.metrics)) or 'nothing'}")
        if not math.isfinite(value):
            raise NonFiniteLossError(f"{section.metric} is {value}")
    # MLflow is closed before Optuna is told: should the process die in between, the trial is
    # still RUNNING in Optuna, so the coordinator fails it in both, and the two stay in agreement
    except optuna.TrialPruned as exc:
        runner.end_run(mlf, run_id, "pruned", str(exc))
        ostudy.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return "pruned"
    except (Exception, KeyboardInterrupt, SystemExit) as exc:
        # the trial ends failed, as in Optuna; Lightning turns a Ctrl-C into SystemExit, which
        # counts as the user's interrupt only if this process did receive SIGINT
        killed = isinstance(exc, (KeyboardInterrupt, SystemExit))
        interrupted = isinstance(exc, KeyboardInterrupt) or (killed and _sigint_received)
        if interrupted:
            reason = "interrupted (Ctrl-C) while running; the next run retries it"
            trial.set_user_attr(INTERRUPTED_ATTR, True)
        else:
            reason = exc.detail if isinstance(exc, SpecError) else f"{type(exc).__name__}: {exc}"
        trial.set_user_attr(ERROR_ATTR, reason[:2000])
        runner.end_run(mlf, run_id, "failed", reason if interrupted else exc)
        ostudy.tell(trial, state=optuna.trial.TrialState.FAIL)
        if killed:
            raise
        return "failed"
    mlf.log_metric(run_id, "objective", value)
    runner.end_run(mlf, run_id, "complete")
    ostudy.tell(trial, value)
    return "complete"


# ---- the worker process ------------------------------------------------------------------------
_sigint_received = False


def _on_sigint(signum, frame):
    global _sigint_received
    _sigint_received = True
    raise KeyboardInterrupt
def worker_main(job: Job, slot: Slot) -> None:
    """Entry point of a worker process (started with the ``spawn`` method)."""
    # pin the device before anything can initialise CUDA; slot.gpu indexes the GPUs the
    # coordinator could see, which may themselves be a CUDA_VISIBLE_DEVICES selection
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if slot.gpu is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[slot.gpu] if visible else str(slot.gpu)
    os.environ.setdefault("OMP_NUM_THREADS", str(slot.threads))
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    import logging
    import warnings

    import optuna
    import pytorch_lightning  # noqa: F401 - sets its logger's level on import; quieten it after
    import torch

    torch.set_num_threads(slot.threads)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from orchestrator import tracking
    from orchestrator.study import make_pruner, make_sampler, open_storage

    section = job.study.section
    ostudy = optuna.load_study(study_name=job.study.name, storage=open_storage(job.storage_url),
                               sampler=make_sampler(section, seed_offset=job.seed_offset + slot.index),
                               pruner=make_pruner(section, job.study.base.trainer.get("max_epochs")))
    mlf = tracking.client(job.tracking_uri)
    lock = claim_lock(job.storage_url)
    while True:
        trial = claim(ostudy, job.budget, lock, job.deadline, mlf)
        if trial is None:
            return
        from optuna.storages._heartbeat import get_heartbeat_thread

        # RDB storages: a heartbeat marks this trial alive for workers on other machines
        with get_heartbeat_thread(trial._trial_id, ostudy._storage):
            run_trial(job, ostudy, trial, mlf, slot)


def fail_stale(ostudy, mlf) -> list[int]:
    """Fail the running trials whose heartbeat is older than the storage's grace period."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    storage = ostudy._storage
    if not (isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)):
        return []
    stale = set(storage._get_stale_trial_ids(ostudy._study_id))
    trials = [t for t in ostudy.get_trials(deepcopy=False) if t._trial_id in stale]
    return fail_trials(ostudy, mlf, trials, lambda t: f"worker {t.user_attrs.get(WORKER_ATTR, '?')} stopped "
                       "sending heartbeats (lost node or killed process)")


def fail_trials(ostudy, mlf, trials, reason, interrupted: bool = False) -> list[int]:
    """Mark ``trials`` FAILED with ``reason(trial)``, in Optuna and in their MLflow runs.

    ``interrupted``: the user stopped them; they use no budget and the next run retries them.
    """
    import optuna

    from orchestrator import runner

    failed = []
    for t in trials:
        why = reason(t)
        with contextlib.suppress(Exception):
            ostudy._storage.set_trial_user_attr(t._trial_id, ERROR_ATTR, why)
            if interrupted:
                ostudy._storage.set_trial_user_attr(t._trial_id, INTERRUPTED_ATTR, True)
        try:
            ostudy._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
        except Exception:  # noqa: BLE001 - finished meanwhile by someone else
            continue
        run_id = t.user_attrs.get(RUN_ATTR)
        if run_id:
            with contextlib.suppress(Exception):
                runner.end_run(mlf, run_id, "failed", why)
        failed.append(t.number)
    return failed


def fail_orphans(ostudy, mlf, dead: set[str] | None = None, interrupted: bool = False) -> list[int]:
    """Mark FAILED the running trials whose worker is gone, in Optuna and MLflow alike.

    ``dead``: the ids (:func:`worker_id`) of workers known to have died; ``None``: every worker of
    this host whose process no longer exists (what an earlier, killed invocation left behind),
    and every trial with no owner at all (its worker died while claiming it; call this under the
    claim lock, so that no live worker is in the middle of a claim).
    ``interrupted``: the workers were stopped by the user (see :func:`fail_trials`).
    """
    import optuna

    host = socket.gethostname()
    orphans = []
    for t in ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = t.user_attrs.get(WORKER_ATTR, "")
        owner_host, _, pid = owner.rpartition(":")
        if dead is not None and owner not in dead:
            continue
        if dead is None and owner and (owner_host != host or not pid.isdigit() or _pid_alive(int(pid))):
            continue
        orphans.append(t)
    if interrupted:
        return fail_trials(ostudy, mlf, orphans, lambda t: "interrupted (Ctrl-C) while running; the next run "
                           "retries it", interrupted=True)
    return fail_trials(ostudy, mlf, orphans, lambda t: f"worker {t.user_attrs[WORKER_ATTR]} died while running "
                       "this trial" if t.user_attrs.get(WORKER_ATTR) else "its worker died while claiming it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

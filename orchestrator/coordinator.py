"""``orch study run``: create or resume the study, start the workers, watch them, summarise.

The coordinator owns the study's MLflow parent run and the worker processes; the trials
themselves are claimed, run and recorded by the workers (:mod:`orchestrator.workers`).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field

from orchestrator import tracking, workers
from orchestrator.config import SpecError
from orchestrator.study import Study, default_storage_url, grid_size, open_storage


@dataclass
class Outcome:
    name: str
    counts: dict[str, int]
    best_value: float | None
    best_params: dict = field(default_factory=dict)
    parent_run_id: str | None = None


def create_or_load(study: Study, storage_url: str):
    """The Optuna study (created on first use); a direction that differs from the stored one is an error."""
    import optuna

    direction = study.section.direction
    try:
        ostudy = optuna.create_study(study_name=study.name, storage=open_storage(storage_url), direction=direction,
                                     load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - unreachable server, bad URL, missing driver, ...
        raise SpecError(f"cannot open the Optuna storage {tracking.redact(storage_url)}: {type(exc).__name__}: "
                        f"{tracking.redact(str(exc))}") from None
    stored = ostudy.direction.name.lower()
    if stored != direction:
        raise SpecError(f"{study.src.where('study.direction')}: study {study.name!r} in "
                        f"{tracking.redact(storage_url)} was created to {stored}, not {direction}; "
                        "use another study name or storage")
    return ostudy


def parent_run(mlf, study: Study, storage_url: str) -> str:
    """The study's parent run: found by its tags when resuming, else created with the study settings."""
    from orchestrator import runner

    exp_id = tracking.experiment_id(mlf, study.name)
    found = mlf.search_runs([exp_id], filter_string=f"tags.`orch.role` = 'study' and tags.`orch.study` = '{study.name}'",
                            max_results=1)
    if found:
        run_id = found[0].info.run_id
        mlf.update_run(run_id, status="RUNNING")
        return run_id
    run_id = runner.start_run(mlf, study.name, run_name=f"study-{study.name}",
                              tags={"orch.role": "study", "orch.study": study.name,
                                    "orch.storage": tracking.redact(storage_url)})
    s = study.section
    params = {"study.metric": s.metric, "study.direction": s.direction, "study.sampler": s.sampler.type,
              "study.pruner": s.pruner.type, **{f"study.sampler.{k}": v for k, v in s.sampler.options.items()},
              **{f"study.pruner.{k}": v for k, v in s.pruner.options.items()},
              **{f"space.{k}": p.model_dump(exclude_none=True) for k, p in s.space.items()},
              **{f"fixed.{k}": v for k, v in study.base.flat_params().items()}}
    tracking.log_params(mlf, run_id, params)
    import yaml

    mlf.log_text(run_id, tracking.redact(yaml.safe_dump(study.data, sort_keys=False)), "study.yaml")
    return run_id


def counts_of(trials) -> dict[str, int]:
    """Trials by state; ``interrupted`` (stopped by the user, retried) are apart from ``failed``."""
    out = {"complete": 0, "pruned": 0, "failed": 0, "interrupted": 0, "running": 0, "waiting": 0}
    for t in trials:
        key = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
               "WAITING": "waiting"}[t.state.name]
        if key == "failed" and t.user_attrs.get(workers.INTERRUPTED_ATTR):
            key = "interrupted"
        out[key] += 1
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
    interrupted = f", {counts['interrupted']} interrupted" if counts.get("interrupted") else ""
    return (f"study {name}: {done}{total} done ({counts['complete']} complete, {counts['pruned']} pruned, "
            f"{counts['failed']} failed{interrupted}), {counts['running']} running; best {metric} {best_text}")


def run_study(study: Study, *, trials: int | None, timeout: float | None, workers_n: int | None,
              devices: list[int] | None, storage_url: str | None, tracking_uri: str | None,
              echo=print, live: bool = False) -> Outcome:
    """Run ``study`` until its budget (``trials``, else the file's) is met or ``timeout`` passes."""
    import optuna

    section = study.section
    budget = trials if trials is not None else section.trials
    timeout = timeout if timeout is not None else section.timeout
    size = grid_size(section)
    if size is not None and (budget is None or budget > size):
        budget = size  # a grid is done once every point has been tried
    if budget is None and timeout is None:
        raise SpecError(f"{study.src.path}: no budget: set study.trials or study.timeout, or pass --trials/--timeout")
    storage_url = storage_url or section.storage or default_storage_url(study.name)
    workers.claim_lock(storage_url)  # a storage with no lock for the shared budget is refused here
    uri = tracking.resolve_tracking_uri(tracking_uri or study.base.tracking_uri)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ostudy = create_or_load(study, storage_url)
    mlf = tracking.client(uri)
    # under the claim lock, no worker is between asking for a trial and recording itself as its owner
    with workers.claim_lock(storage_url):
        orphans = workers.fail_orphans(ostudy, mlf)  # trials of workers that died in an earlier invocation
        retries = workers.requeue_interrupted(ostudy)
    if orphans:
        echo(f"marked trials {orphans} failed: their worker process is gone")
    parent_id = parent_run(mlf, study, storage_url)
    if retries:
        echo(f"trials {retries} were interrupted: they are queued to run again with the same parameters")

    trials_so_far = ostudy.get_trials(deepcopy=False)
    already = workers.counted(trials_so_far)
    slots = _slots(study, devices, workers_n or section.resources.workers)
    if budget is not None:
        slots = slots[:max(budget - already, 0)] or []
    deadline = time.time() + timeout if timeout else None
    job = workers.Job(study=study, storage_url=storage_url, tracking_uri=uri, parent_run_id=parent_id,
                      budget=budget, deadline=deadline, seed_offset=len(trials_so_far) * 7919)
    echo(f"study {study.name}: {already} trials so far, budget {budget or 'none'}"
         f"{f', timeout {timeout:g}s' if timeout else ''}; {len(slots)} worker(s) on "
         f"{', '.join(s.device for s in slots) or 'nothing (budget met)'}; storage {tracking.redact(storage_url)}; "
         f"MLflow {tracking.redact(uri)}")
    _supervise(job, slots, ostudy, mlf, budget, echo, live)
    return _finish(study, ostudy, mlf, parent_id)


def _slots(study: Study, devices: list[int] | None, workers_n: int | None) -> list[workers.Slot]:
    accelerator = str(study.base.trainer.get("accelerator", "auto"))
    devices = devices or study.section.resources.devices
    gpu_count = 0
    if accelerator != "cpu":
        import torch

        gpu_count = torch.cuda.device_count()
        if devices and any(d >= gpu_count or d < 0 for d in devices):
            raise SpecError(f"devices {devices}: this machine has {gpu_count} visible GPU(s)")
    return workers.plan_slots(accelerator=accelerator, devices=devices, workers=workers_n,
                              trials_per_device=study.section.resources.trials_per_device,
                              gpu_count=gpu_count, cpu_count=os.cpu_count() or 1)


def _supervise(job, slots, ostudy, mlf, budget, echo, live: bool) -> None:
    """Start one process per slot, replace any that dies (its trial is marked failed), show progress."""
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.Process] = {}

    def start(slot):
        p = ctx.Process(target=workers.worker_main, args=(job, slot), name=f"orch-worker-{slot.index}")
        p.start()
        procs[slot.index] = p

    for slot in slots:
        start(slot)
    last = ""
    crashes = {slot.index: 0 for slot in slots}  # consecutive crashes with no trial finished between
    display = _Display(live)
    try:
        with display:
            while procs:
                for slot in slots:
                    p = procs.get(slot.index)
                    if p is None or p.is_alive():
                        continue
                    p.join()
                    del procs[slot.index]
                    if p.exitcode != 0:
                        failed = workers.fail_orphans(ostudy, mlf, dead={workers.worker_id(p.pid)})
                        crashes[slot.index] = crashes[slot.index] + 1 if not failed else 0
                        give_up = crashes[slot.index] >= 3
                        echo(f"worker {slot.index} ({slot.device}) exited with code {p.exitcode}"
                             + (f"; trial(s) {failed} marked failed" if failed else "")
                             + ("; it keeps failing before running a trial, so it is not restarted"
                                if give_up else "; restarting it"))
                        if not give_up:
                            start(slot)
                trials = ostudy.get_trials(deepcopy=False)
                best, _ = best_of(ostudy)
                line = _progress(job.study.name, counts_of(trials), budget, best, job.study.section.metric)
                if line != last:
                    if live:
                        display.update(line, trials)
                    else:
                        echo(line)
                    last = line
                time.sleep(0.5)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        echo("interrupted: stopping the workers; their running trials are marked interrupted, "
             "and the same command runs them again")
        # a Ctrl-C at the terminal reaches the workers too: give them time to close their trials
        for p in procs.values():
            p.join(timeout=15)
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)
                p.join(timeout=15)
            if p.is_alive():
                p.kill()
                p.join()
        # under the claim lock, an ownerless running trial is one a stopped worker had just asked for
        with workers.claim_lock(job.storage_url):
            workers.fail_orphans(ostudy, mlf, dead={workers.worker_id(p.pid) for p in procs.values()} | {""},
                                 interrupted=True)
        mlf.set_terminated(job.parent_run_id, "KILLED")
        raise


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

    def update(self, line: str, trials) -> None:
        from rich.console import Group

        self.live.update(Group(line, trials_table(trials[-15:])))


def trials_table(trials):
    from rich.table import Table

    table = Table("trial", "state", "value", "params", "duration")
    for t in trials:
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
            t.datetime_start else None
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        reason = t.user_attrs.get(workers.ERROR_ATTR)
        table.add_row(str(t.number), t.state.name.lower() + (f" ({reason[:60]})" if reason else ""),
                      _fmt(t.value) if t.value is not None else "-", params,
                      f"{duration:.1f}s" if duration is not None else "-")
    return table


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _finish(study: Study, ostudy, mlf, parent_id: str) -> Outcome:
    """Best value and params on the parent run, plus the Optuna plots; the parent run ends FINISHED."""
    trials = ostudy.get_trials(deepcopy=False)
    counts = counts_of(trials)
    best_value, best_params = best_of(ostudy)
    for state, n in counts.items():
        mlf.log_metric(parent_id, f"trials_{state}", n)
    if best_value is not None and math.isfinite(best_value):
        mlf.log_metric(parent_id, f"best_{study.section.metric}", best_value)
        best = ostudy.best_trial
        mlf.set_tag(parent_id, "best.trial", str(best.number))
        if best.user_attrs.get(workers.RUN_ATTR):
            mlf.set_tag(parent_id, "best.run_id", best.user_attrs[workers.RUN_ATTR])
        for k, v in best_params.items():
            mlf.set_tag(parent_id, f"best.{k}", str(v))
    _log_plots(ostudy, mlf, parent_id)
    mlf.set_terminated(parent_id, "FINISHED")
    return Outcome(study.name, counts, best_value, best_params, parent_id)


def _log_plots(ostudy, mlf, run_id: str) -> None:
    """Optimisation history, parameter importances and parallel coordinates as PNG artifacts."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in ostudy.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    plots = {"optimization_history": ovm.plot_optimization_history}
    if len(complete) >= 2 and any(t.params for t in complete):
        plots["parallel_coordinate"] = ovm.plot_parallel_coordinate
        distinct = {k for t in complete for k in t.params if len({str(u.params.get(k)) for u in complete}) > 1}
        if distinct:
            plots["param_importances"] = ovm.plot_param_importances
    for name, fn in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(ostudy)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(10, 6)
            mlf.log_figure(run_id, fig, f"plots/{name}.png")
            plt.close(fig)
        except Exception as exc:  # noqa: BLE001 - a plot that cannot be drawn is not worth failing a study
            mlf.set_tag(run_id, f"plots.{name}.error", f"{type(exc).__name__}: {exc}"[:500])

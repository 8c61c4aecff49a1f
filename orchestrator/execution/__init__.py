"""A study on this machine: the coordinator (:mod:`~orchestrator.execution.coordinator`) opens it
(:mod:`~orchestrator.execution.opening`) and supervises one worker process per slot
(:mod:`~orchestrator.execution.slots`, :mod:`~orchestrator.execution.workers`); each worker claims
trials under the study's lock (:mod:`~orchestrator.execution.claims`), keeps their heartbeat
(:mod:`~orchestrator.execution.heartbeat`) and runs them (:mod:`~orchestrator.execution.trial`);
every trial ends through :mod:`~orchestrator.execution.outcomes`. Signals:
:mod:`~orchestrator.execution.stopping`."""

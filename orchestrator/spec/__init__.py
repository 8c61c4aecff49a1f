"""From a study file to a validated spec: YAML with line numbers (:mod:`~orchestrator.spec.files`),
a run's settings (:mod:`~orchestrator.spec.run`), the search space (:mod:`~orchestrator.spec.space`),
the ``study`` section (:mod:`~orchestrator.spec.study`) and its sampler and pruner
(:mod:`~orchestrator.spec.samplers`). No store is read or written here."""

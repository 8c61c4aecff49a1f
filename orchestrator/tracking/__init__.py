"""MLflow: the store and its client (:mod:`~orchestrator.tracking.client`), every run's start and
end (:mod:`~orchestrator.tracking.runs`), a study's parent run (:mod:`~orchestrator.tracking.parent`),
how a study looks in the UI (:mod:`~orchestrator.tracking.views`) and the Lightning logger that
writes a fit's metrics (:mod:`~orchestrator.tracking.epoch_logger`)."""

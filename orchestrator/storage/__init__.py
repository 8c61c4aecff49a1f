"""The Optuna side of a study: store URLs (:mod:`~orchestrator.storage.urls`), opening a storage
(:mod:`~orchestrator.storage.backends`), journal files (:mod:`~orchestrator.storage.journal`), the
locks every process of a study shares (:mod:`~orchestrator.storage.locks`), probe writes
(:mod:`~orchestrator.storage.probes`), what orch keeps with a study (:mod:`~orchestrator.storage.record`),
who owns a running trial (:mod:`~orchestrator.storage.owners`) and every use of Optuna's private
API (:mod:`~orchestrator.storage.optuna_api`)."""

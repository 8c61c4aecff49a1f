"""orch: a plugin-based experiment orchestrator for recurrent sequence models.

The package root stays import-light: torch, Lightning, MLflow and Optuna are imported only by
the modules that need them, so that ``orch --help`` and ``orch plugins list`` start quickly.
"""

__version__ = "0.1.0"

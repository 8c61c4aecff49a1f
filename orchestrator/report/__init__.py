"""A study for people: in the terminal (:mod:`~orchestrator.report.terminal`), as figures
(:mod:`~orchestrator.report.figures`) and as one HTML page (:mod:`~orchestrator.report.page`), all
from the Optuna storage; what they share is :mod:`~orchestrator.report.summary`."""

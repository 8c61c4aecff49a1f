"""The study's Optuna sampler and pruner, made from its ``study.sampler`` and ``study.pruner``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.spec.space import grid_points

if TYPE_CHECKING:  # for the annotations only: spec.study builds on this module
    from orchestrator.spec.study import StudySection


def make_sampler(section: StudySection, offset: int = 0):
    """The study's sampler for the worker whose seed offset is ``offset``.

    Every worker that joins a study gets an offset of its own (0, 1, 2, ... in the order they
    join, handed out under the study's lock), and a seeded sampler draws with ``seed + offset``:
    one worker on a fresh study draws exactly the sequence of the file's seed, and any
    number of workers, started at the same instant on any machine, draw distinct sequences. QMC
    and grid keep the file's seed for all: their points are shared and handed out in turn.
    """
    import optuna

    opts = section.sampler.options
    kind = section.sampler.type
    if kind == "qmc":
        opts.setdefault("seed", 0)  # one sequence for every worker, indexed by trial number
    elif opts.get("seed") is not None and kind != "grid":  # a grid's order must be shared too
        opts["seed"] = int(opts["seed"]) + offset
    if kind == "tpe":
        return optuna.samplers.TPESampler(**opts)
    if kind == "random":
        return optuna.samplers.RandomSampler(**opts)
    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(**opts)
    if kind == "qmc":
        return optuna.samplers.QMCSampler(**opts)
    class Grid(optuna.samplers.GridSampler):
        # Optuna's grid sampler stops the study from inside ``tell`` once the grid is covered,
        # which is only allowed within ``Study.optimize``; orch's workers stop on the budget,
        # which the coordinator caps at the grid size.
        def after_trial(self, study, trial, state, values):
            pass

    return Grid(grid_points(section), **opts)


def make_pruner(section: StudySection, max_epochs: int | None):
    import optuna

    opts = section.pruner.options
    kind = section.pruner.type
    if kind == "median":
        return optuna.pruners.MedianPruner(**opts)
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**opts)
    if kind == "hyperband":
        opts.setdefault("max_resource", max_epochs or "auto")
        return optuna.pruners.HyperbandPruner(**opts)
    return optuna.pruners.NopPruner()

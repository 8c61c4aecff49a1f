"""Pruning savings: the same study with its pruner and without, side by side in one command, for
several seeds.

    python benchmarks/pruning.py                                   # sum game, 12 trials, seeds 0 1 2
    python benchmarks/pruning.py --seeds 0 1 2 3 --workers 2
    ORCH_DATA_DIR=../shared/data python benchmarks/pruning.py --study studies/ptb_small.yaml --trials 8 \
        --set trainer.limit_train_batches=40 --set trainer.limit_val_batches=10
    python benchmarks/pruning.py --pruner '{type: median, n_startup_trials: 4, n_warmup_steps: 5}' \
        --pruner '{type: successive_halving, min_resource: 2, reduction_factor: 4}'

For each seed (the run's ``seed`` and the sampler's), the arms run the study file's sampler through
the real ``orch study run`` command, each in a fresh temporary directory: one with
``study.pruner={type: none}``, then one per pruner (the file's, or each ``--pruner``). Reported per
arm and seed: epochs trained (the cost that pruning saves, independent of this machine's speed),
wall time, trials pruned, and the best value found; for a pruned arm, its epochs as a fraction of
the unpruned arm's and its best value's shortfall relative to the unpruned best (0: as good or
better); and per pruner the spread of both over the seeds (min, median, max). The sampler sees
pruned trials' values, so the arms' later trials differ: the ratio is the saving of a real study,
not of a replay.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml
from studyrun import study_run


def epochs_trained(cwd: str) -> dict:
    """Epochs reported by every trial of the one study under ``cwd``/mlruns/optuna."""
    import optuna

    [journal] = (Path(cwd) / "mlruns" / "optuna").glob("*.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=journal.stem, storage=storage)
    return {"epochs": sum(len(t.intermediate_values) for t in study.trials)}


def shortfall(pruned: float, unpruned: float, direction: str) -> float:
    """How much worse the pruned arm's best is, relative to the unpruned best (0: as good or better)."""
    worse = unpruned - pruned if direction == "maximize" else pruned - unpruned
    return max(worse, 0.0) / abs(unpruned)


def spread(values: list[float]) -> dict:
    return {"min": round(min(values), 4), "median": round(statistics.median(values), 4), "max": round(max(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="studies/sum_game.yaml")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pruner", action="append", default=[],
                        help="a pruned arm's pruner (YAML), instead of the file's; repeat for several arms")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    study = str(Path(args.study).resolve())
    data = yaml.safe_load(Path(study).read_text())
    direction = data["study"]["direction"]
    pruners = args.pruner or [json.dumps(data["study"].get("pruner", {"type": "none"}))]
    rows: dict[int, dict] = {}
    for seed in args.seeds:
        base = ["trainer.accelerator=cpu", f"seed={seed}", f"study.sampler.seed={seed}", *args.overrides]
        rows[seed] = {}
        for arm, pruner in (("unpruned", "{type: none}"), *((p, p) for p in pruners)):
            out, wall, seen = study_run(study, workers=args.workers, trials=args.trials,
                                        overrides=[*base, f"study.pruner={pruner}"], inspect=epochs_trained)
            row = rows[seed][arm] = {"complete": out["complete"], "pruned": out["pruned"], "failed": out["failed"],
                                     "epochs": seen["epochs"], "wall_s": round(wall, 1),
                                     "best_value": out["best_value"]}
            if arm != "unpruned":
                u = rows[seed]["unpruned"]
                row["epochs / unpruned"] = round(row["epochs"] / u["epochs"], 4)
                row["best shortfall"] = round(shortfall(row["best_value"], u["best_value"], direction), 5)
            print(f"seed {seed} {arm}: {seen['epochs']} epochs in {wall:.1f} s, {out['pruned']} of "
                  f"{args.trials} trials pruned, best {out['best_value']:.6g}", flush=True)
    summary = {}
    for pruner in pruners:
        ratios = [rows[s][pruner]["epochs / unpruned"] for s in args.seeds]
        gaps = [rows[s][pruner]["best shortfall"] for s in args.seeds]
        summary[pruner] = {"epochs / unpruned": spread(ratios), "best shortfall": spread(gaps)}
        print(f"{pruner}: epochs x{statistics.median(ratios):.2f} of the unpruned study (per seed: "
              f"{', '.join(f'{r:.2f}' for r in ratios)}); best short of the unpruned best by "
              f"{', '.join(f'{g:.2%}' for g in gaps)}", flush=True)
    print(json.dumps({"study": args.study, "trials": args.trials, "summary": summary, "seeds": rows}))


if __name__ == "__main__":
    main()

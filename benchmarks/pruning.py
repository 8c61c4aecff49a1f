"""Pruning savings: the same study with its pruner and without, side by side in one command.

    python benchmarks/pruning.py                                   # sum game, 12 trials, 1 worker
    python benchmarks/pruning.py --trials 16 --workers 2 --set trainer.max_epochs=20

Both arms run the study file's sampler with the same seed through the real ``orch study run``
command, each in a fresh temporary directory: one with the file's pruner, one with
``study.pruner={type: none}``. Reported per arm: epochs trained (the cost that pruning saves,
independent of this machine's speed), wall time, trials pruned, and the best value found; then
the pruned arm as a ratio of the unpruned one. The sampler sees pruned trials' values, so the
two arms' later trials differ: the ratio is the saving of a real study, not of a replay.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from studyrun import study_run


def epochs_trained(cwd: str) -> dict:
    """Epochs reported by every trial of the one study under ``cwd``/mlruns/optuna."""
    import optuna

    [journal] = (Path(cwd) / "mlruns" / "optuna").glob("*.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=journal.stem, storage=storage)
    return {"epochs": sum(len(t.intermediate_values) for t in study.trials)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="studies/sum_game.yaml")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    study = str(Path(args.study).resolve())
    base = ["trainer.accelerator=cpu", *args.overrides]
    rows = {}
    for arm, extra in (("pruned", []), ("unpruned", ["study.pruner={type: none}"])):
        out, wall, seen = study_run(study, workers=args.workers, trials=args.trials, overrides=base + extra,
                                    inspect=epochs_trained)
        rows[arm] = {"complete": out["complete"], "pruned": out["pruned"], "failed": out["failed"],
                     "epochs": seen["epochs"], "wall_s": round(wall, 1), "best_value": out["best_value"]}
        print(f"{arm:>8}: {rows[arm]['epochs']} epochs in {rows[arm]['wall_s']} s, {out['pruned']} of "
              f"{args.trials} trials pruned, best {out['best_value']:.6g}", flush=True)
    p, u = rows["pruned"], rows["unpruned"]
    print(f"pruned / unpruned: epochs x{p['epochs'] / u['epochs']:.2f}, wall x{p['wall_s'] / u['wall_s']:.2f}, "
          f"best {p['best_value']:.6g} vs {u['best_value']:.6g}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

"""Worker scaling: trials per hour of a study with 1 and with N worker processes, as a ratio.

    python benchmarks/scaling.py                          # sum game, 1 vs 2 CPU workers
    python benchmarks/scaling.py --workers 1 2 4 --trials 8 --set trainer.max_epochs=5

Every trial trains the same model (the study's space is replaced by a grid over the seed), so
the trials cost the same and the ratio measures orch's parallel execution alone: process
start-up, trial claiming, MLflow/Optuna I/O and the split of the CPU threads. Each run is a
fresh study in a temporary directory, driven through the real ``orch study run`` command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from studyrun import study_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="studies/sum_game.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    study = str(Path(args.study).resolve())
    seeds = list(range(args.trials))
    space = "{seed: {type: categorical, choices: %s}}" % seeds
    overrides = [f"study.space={space}", "study.sampler={type: grid}", "study.pruner={type: none}",
                 "trainer.accelerator=cpu", *args.overrides]
    results = []
    for n in args.workers:
        out, wall, _ = study_run(study, workers=n, trials=args.trials, overrides=overrides)
        row = {"workers": n, "trials": out["complete"], "failed": out["failed"], "wall_s": round(wall, 1),
               "trials_per_hour": round(out["complete"] / wall * 3600, 1)}
        results.append(row)
        base = results[0]["trials_per_hour"]
        print(f"{n} worker(s): {row['trials']} trials in {row['wall_s']} s = {row['trials_per_hour']} trials/h "
              f"(x{row['trials_per_hour'] / base:.2f} of {results[0]['workers']} worker)", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

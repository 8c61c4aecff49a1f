"""Packing: trials per hour with k trials at once on one GPU (``--trials-per-device k``), as a ratio
to one trial per GPU, for k = 1, 2, 4, 8, in one command.

    ORCH_DATA_DIR=../shared/data python benchmarks/packing.py --accelerator gpu           # the curve on GPU 0
    ORCH_DATA_DIR=../shared/data python benchmarks/packing.py --per-device 1 2 --steps 50  # CPU: k worker processes

Every trial trains the same ptb_small-sized model (``studies/ptb_small.yaml``, its space replaced
by a grid over the seed, no pruning) for ``--steps`` training windows and one validation pass of
``--val-steps`` windows, so the trials cost the same and the ratio measures what packing buys:
a small model leaves most of a GPU idle, and k processes fill it until the GPU (or the host's
cores, data loading, or CUDA context memory) runs out. Each k runs ``k * --rounds`` trials in a
fresh study through the real ``orch study run`` command; trials per hour count the whole command.
On a CPU, k is the number of worker processes (``--workers k``), which share the machine's cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from studyrun import study_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="studies/ptb_small.yaml")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--per-device", type=int, nargs="+", default=[1, 2, 4, 8], help="trials at once")
    parser.add_argument("--rounds", type=int, default=2, help="trials per packed slot (k * rounds trials per k)")
    parser.add_argument("--steps", type=int, default=400, help="training windows per trial")
    parser.add_argument("--val-steps", type=int, default=50, help="validation windows per trial")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    study = str(Path(args.study).resolve())
    results = []
    for k in args.per_device:
        trials = k * args.rounds
        space = "{seed: {type: categorical, choices: %s}}" % list(range(trials))
        overrides = [f"study.space={space}", "study.sampler={type: grid}", "study.pruner={type: none}",
                     f"trainer.accelerator={args.accelerator}", "trainer.max_epochs=1",
                     f"trainer.limit_train_batches={args.steps}", f"trainer.limit_val_batches={args.val_steps}",
                     *args.overrides]
        if args.accelerator == "gpu":
            out, wall, _ = study_run(study, workers=None, trials=trials, overrides=overrides,
                                     options=["--devices", "0", "--trials-per-device", str(k)])
        else:
            out, wall, _ = study_run(study, workers=k, trials=trials, overrides=overrides)
        row = {"per_device": k, "accelerator": args.accelerator, "trials": out["complete"], "failed": out["failed"],
               "wall_s": round(wall, 1), "trials_per_hour": round(out["complete"] / wall * 3600, 1)}
        results.append(row)
        base = results[0]["trials_per_hour"]
        print(f"{k} at once ({args.accelerator}): {row['trials']} trials in {row['wall_s']} s = "
              f"{row['trials_per_hour']} trials/h (x{row['trials_per_hour'] / base:.2f} of {results[0]['per_device']})",
              flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Every GPU figure of the benchmarks, in one go, on GPU 0 (at most 9.5 minutes: each has a time limit):
#   ORCH_DATA_DIR=../shared/data bash benchmarks/gpu.sh [OUT_DIR]
# Each benchmark's output goes to OUT_DIR/NAME.txt (default: ./gpu-results); a benchmark that fails
# is reported and the others still run. Ratios are measured side by side within each benchmark.
set -u
out=${1:-gpu-results}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/summary.txt" 2>&1
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" >> "$out/summary.txt" 2>&1
run() {  # NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
}
# in order of what matters most, so that a cut-short run still has it. Durations on an H200
# (2026-11-26): tests 15 s, fastpath 126 s, cells 8 s, throughput about 80 s, packing about 160 s.
run tests 50 "$py" -m pytest -q -p no:cacheprovider "$here/../tests/test_training.py" -k "gpu"
run fastpath 170 "$py" "$here/fastpath.py" --accelerator gpu --study "$here/../studies/ptb.yaml"
run cells 45 "$py" "$here/cells.py" --device cuda --graphs
run throughput 130 "$py" "$here/throughput.py" --accelerator gpu --cells lstm --steps 300 --rounds 2 \
  --study "$here/../studies/ptb_small.yaml"
run packing 170 "$py" "$here/packing.py" --accelerator gpu --per-device 1 2 4 8 --rounds 2 --steps 300 \
  --val-steps 20 --study "$here/../studies/ptb_small.yaml"
# not here: startup.py (over 60 s on a GPU machine, whose first imports are slow) and the diy_lstm
# epoch (fastpath.py --cell diy_lstm, over a minute per variant); run them on their own

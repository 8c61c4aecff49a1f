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
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/device.txt" 2>&1
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" >> "$out/device.txt" 2>&1
run() {  # NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
}
run throughput 180 "$py" "$here/throughput.py" --accelerator gpu --steps 300 --rounds 2
run cells 60 "$py" "$here/cells.py" --device cuda
run overhead 90 "$py" "$here/overhead.py" --accelerator gpu --steps 300
run packing 180 "$py" "$here/packing.py" --accelerator gpu --per-device 1 2 4 8 --rounds 1 --steps 300
run startup 60 "$py" "$here/startup.py" --study "$here/../studies/ptb.yaml"

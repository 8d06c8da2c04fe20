#!/usr/bin/env bash
# Sent to the GPU machine (device `run`): kernel tests, then bench/kernels_gpu.py; logs under $OUT.
#   bash bench/gpu_run.sh [bench args, e.g. --quick --no-sweep]
# Each part runs under its own timeout so a failure or hang in one still lets the next report.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/mmhpc_gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PY:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

echo "=== tests ==="
timeout "${TEST_TIMEOUT:-200}" $PY bench/run_gpu_tests.py 2>&1 | tee "$OUT/tests.log"

echo "=== bench ==="
timeout "${BENCH_TIMEOUT:-300}" $PY bench/kernels_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
echo "=== done ==="

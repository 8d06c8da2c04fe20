#!/usr/bin/env bash
# One device call (one H100): issue 10 same-GPU NIXL sweep (bench/nixl_gpu.py), the decode
# attention kernel tests, then issue 8's decode part of bench/gpu_engine.py. Each part under its
# own timeout, so one failure still lets the rest report. Everything printed: $OUT/run.log.
#   bash bench/gpu_issue10.sh            (carry .whl, filled by ../shared/tools/gpu-wheels.sh)
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8 MMHPC_CACHE=/tmp/mmhpc-cache
OUT=${OUT:-/tmp/gpu_issue10}; mkdir -p "$OUT"; export OUT
{
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nvidia-smi topo -m; nvidia-smi nvlink -s 2>&1 | head -20
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
ls /tmp/site/nixl_cu13.libs/ucx/ 2>&1 | head -20; find / -name 'ucx_info*' -type f 2>/dev/null | head -3
echo "=== nixl_gpu ==="
timeout "${NIXL_TIMEOUT:-210}" python3 bench/nixl_gpu.py ${NIXL_ARGS:-}
echo "=== decode kernel tests ==="
timeout "${TEST_TIMEOUT:-90}" python3 bench/run_gpu_tests.py test_decode
echo "=== gpu_engine ${ENGINE_PARTS:-ceilings,correctness,decode} ==="
timeout "${ENGINE_TIMEOUT:-300}" python3 bench/gpu_engine.py "${ENGINE_PARTS:-ceilings,correctness,decode}"
echo "=== done $(date -u) ==="
} 2>&1 | tee "$OUT/run.log"

#!/usr/bin/env bash
# Issue 8 GPU run (device tool, carry .whl filled by ../shared/tools/gpu-wheels.sh):
#   ENGINE_PARTS=ceilings,correctness,llava,offline,qwen bash bench/gpu_engine.sh
# parts (bench/gpu_engine.py): ceilings, correctness, llava, exp, offline, qwen (default: all but
# exp). RUN_TESTS=1 (default) runs the GPU kernel tests first. Results, logs, profiles in $OUT.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8 MMHPC_CACHE=/tmp/mmhpc-cache
OUT=${OUT:-/tmp/gpu_engine}; mkdir -p "$OUT"; export OUT
{
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import transformers, triton, torch; print(transformers.__version__, triton.__version__, torch.__version__)"
if [ "${RUN_TESTS:-1}" = 1 ]; then
  echo "=== kernel tests ==="
  timeout "${TEST_TIMEOUT:-150}" python3 bench/run_gpu_tests.py
  timeout "${TEST_TIMEOUT:-150}" python3 bench/run_gpu_tests.py --file tests/test_engine_gpu.py
  timeout "${TEST_TIMEOUT:-150}" python3 bench/run_gpu_tests.py --file tests/test_fast_pixels.py
fi
echo "=== gpu_engine ${ENGINE_PARTS:-ceilings,correctness,llava,offline,qwen} ==="
timeout "${ENGINE_TIMEOUT:-540}" python3 bench/gpu_engine.py \
  "${ENGINE_PARTS:-ceilings,correctness,llava,offline,qwen}"
echo "=== done $(date -u) ==="
} 2>&1 | tee "$OUT/run.log"

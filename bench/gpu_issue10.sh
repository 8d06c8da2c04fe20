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
timeout "${TEST_TIMEOUT:-90}" python3 - <<'PYEOF'
import importlib.util, sys, time, traceback, types
class _Mark:
    def __getattr__(self, name):
        def deco(*args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]
            return lambda fn: fn
        return deco
stub = types.ModuleType("pytest"); stub.mark = _Mark(); sys.modules["pytest"] = stub
sys.path.insert(0, ".")
spec = importlib.util.spec_from_file_location("t", "tests/test_kernels_gpu.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
for name in [n for n in dir(mod) if n.startswith("test_decode")]:
    t0 = time.time()
    try:
        getattr(mod, name)(); print(f"PASSED {name} ({time.time() - t0:.1f} s)", flush=True)
    except Exception:
        print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
PYEOF
echo "=== gpu_engine ${ENGINE_PARTS:-ceilings,correctness,decode} ==="
timeout "${ENGINE_TIMEOUT:-300}" python3 bench/gpu_engine.py "${ENGINE_PARTS:-ceilings,correctness,decode}"
echo "=== done $(date -u) ==="
} 2>&1 | tee "$OUT/run.log"

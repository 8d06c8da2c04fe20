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
if $PY -m pytest --version >/dev/null 2>&1; then
  timeout "${TEST_TIMEOUT:-200}" $PY -m pytest -q -rA --noconftest -o addopts="" \
    -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tee "$OUT/tests.log"
else
  # no pytest in the image: a stand-in `pytest` module whose marks are no-ops, then call each test
  timeout "${TEST_TIMEOUT:-200}" $PY - <<'PYEOF' 2>&1 | tee "$OUT/tests.log"
import importlib.util, sys, time, traceback, types
class _Mark:
    def __getattr__(self, name):
        def deco(*args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]
            return lambda fn: fn
        return deco
stub = types.ModuleType("pytest")
stub.mark = _Mark()
sys.modules["pytest"] = stub
sys.path.insert(0, ".")
spec = importlib.util.spec_from_file_location("test_kernels_gpu", "tests/test_kernels_gpu.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
failed = 0
names = [n for n in dir(mod) if n.startswith("test_")]
for name in names:
    t0 = time.time()
    try:
        getattr(mod, name)()
        print(f"PASSED {name} ({time.time() - t0:.1f} s)", flush=True)
    except Exception:
        failed += 1
        print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
print(f"{len(names) - failed} passed, {failed} failed")
PYEOF
fi

echo "=== bench ==="
timeout "${BENCH_TIMEOUT:-300}" $PY bench/kernels_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
echo "=== done ==="

"""Run the GPU kernel tests (tests/test_kernels_gpu.py) on the GPU machine, whose image has no
pytest: a stand-in `pytest` module whose marks are no-ops, then each test function in turn.
    python3 bench/run_gpu_tests.py [name_prefix]      (default: every test_*)
Prints PASSED/FAILED per test and a count; exit 1 if any failed."""
from __future__ import annotations

import importlib.util
import os
import sys
import time
import traceback
import types


class _Mark:
    def __getattr__(self, name):
        def deco(*args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]
            return lambda fn: fn
        return deco


def main() -> int:
    prefix = sys.argv[1] if len(sys.argv) > 1 else "test_"
    try:
        import pytest  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pytest")
        stub.mark = _Mark()
        sys.modules["pytest"] = stub
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(
        "test_kernels_gpu", os.path.join(root, "tests", "test_kernels_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    names = [n for n in dir(mod) if n.startswith(prefix)]
    failed = 0
    for name in names:
        t0 = time.time()
        try:
            getattr(mod, name)()
            print(f"PASSED {name} ({time.time() - t0:.1f} s)", flush=True)
        except Exception:  # noqa: BLE001
            failed += 1
            print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
    print(f"{len(names) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

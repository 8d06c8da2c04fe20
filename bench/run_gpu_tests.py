"""Run the GPU kernel tests (tests/test_kernels_gpu.py) on the GPU machine, whose image has no
pytest: a stand-in `pytest` module whose marks are no-ops, then each test function in turn.
    python3 bench/run_gpu_tests.py [name_prefix] [--file tests/<file>.py]
(default: every test_* of tests/test_kernels_gpu.py; parametrized tests run with each of their
`pytest.mark.parametrize` values)
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
            if name == "parametrize":               # remember the values, run each
                def keep(fn):
                    fn._params = (args[0], args[1])
                    return fn
                return keep
            return lambda fn: fn
        return deco


def main() -> int:
    argv = sys.argv[1:]
    path = "tests/test_kernels_gpu.py"
    if "--file" in argv:
        i = argv.index("--file")
        path = argv[i + 1]
        del argv[i:i + 2]
    prefix = argv[0] if argv else "test_"
    stub = types.ModuleType("pytest")            # marks as no-ops, whether pytest is there or not
    stub.mark = _Mark()
    sys.modules["pytest"] = stub
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(
        os.path.basename(path)[:-3], os.path.join(root, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    names = [n for n in dir(mod) if n.startswith(prefix)]
    failed = 0
    for name in names:
        t0 = time.time()
        fn = getattr(mod, name)
        try:
            params = getattr(fn, "_params", None)
            if params is None:
                fn()
            else:
                for value in params[1]:
                    fn(**{params[0]: value})
            print(f"PASSED {name} ({time.time() - t0:.1f} s)", flush=True)
        except Exception:  # noqa: BLE001
            failed += 1
            print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
    print(f"{len(names) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

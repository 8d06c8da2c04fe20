"""Start a real `mpirun -n N python -m mmhpc ...` deployment for a test module, and stop it.

The job runs in its own session (process group) so a failed test can take every rank down by
that group's id; the frontend's URL comes from its `mmhpc ready: URL` line.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class Deployment:
    def __init__(self, num_ranks: int, overrides: list[str], log: Path,
                 startup_s: float = 240.0, mpirun_args: tuple[str, ...] = (),
                 rank_wrapper: tuple[str, ...] = ()) -> None:
        self.num_ranks = num_ranks
        self.mpirun_args = list(mpirun_args)
        self.rank_wrapper = list(rank_wrapper)
        self.overrides = ["server.port=0", "server.host=127.0.0.1", *overrides]
        self.log_path = log
        self.startup_s = startup_s
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "Deployment":
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("MMHPC_URL_FILE", None)
        cmd = [str(BIN / "mpirun"), *self.mpirun_args, "-n", str(self.num_ranks),
               *self.rank_wrapper, str(BIN / "python"), "-m", "mmhpc", *self.overrides]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + self.startup_s
        while time.monotonic() < end:
            text = self.log_path.read_text()
            for line in text.splitlines():
                if line.startswith("mmhpc ready: "):
                    self.url = line.split()[2]      # "mmhpc ready: URL (layout)"
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"deployment exited {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"deployment not ready after {self.startup_s}s:\n"
                           f"{self.log_path.read_text()[-3000:]}")

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def ranks(self) -> dict[int, dict]:
        return {int(k): v for k, v in self.get_json("/debug/ranks").items()}

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def leftover_pids(self, wait_s: float = 5.0) -> list[int]:
        """Processes still in the job's session (its ranks, the launcher) after it exited."""
        end = time.monotonic() + wait_s
        while True:
            out = subprocess.run(["pgrep", "-s", str(self.proc.pid)], capture_output=True,
                                 text=True).stdout.split()
            if not out or time.monotonic() > end:
                return [int(p) for p in out]
            time.sleep(0.2)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running(num_ranks: int, overrides: list[str], tmp_path_factory, name: str, **kw):
    """A started Deployment (log in a fresh temporary folder `name`), stopped at the end."""
    dep = Deployment(num_ranks, overrides, tmp_path_factory.mktemp(name) / "job.log", **kw)
    dep.start()
    try:
        yield dep
    finally:
        dep.stop()

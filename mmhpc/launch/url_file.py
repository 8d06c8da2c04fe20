"""The frontend's URL, for scripts: `mmhpc-<jobid>.url` holds one line, `http://NODE:PORT`.

Written once the server is ready, by either:
- `write_url_file(url)`: the launcher main calls it on rank 0 right after printing
  `mmhpc ready: URL`. Under Slurm it writes `$MMHPC_URL_FILE`, else
  `$SLURM_SUBMIT_DIR/mmhpc-$SLURM_JOB_ID.url`; outside Slurm (and without `MMHPC_URL_FILE`) it
  writes nothing.
- `python -m mmhpc.launch.url_file watch --log LOG --out FILE --pid PID`: slurm/serve.sbatch
  runs it beside srun; it follows the job log for the ready line, writes FILE if main has not,
  and prints `mmhpc: frontend URL ...` into the log.
`wait_for_url` is the reader's side (the submitit launcher, tests).
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

READY_PREFIX = "mmhpc ready: "
_READY_RE = re.compile(re.escape(READY_PREFIX) + r"(\S+)")
_ANY_HOST = ("", "0.0.0.0", "::", "[::]")


def url_file_path(env: Mapping[str, str] = os.environ) -> Path | None:
    """Where this job's URL file goes; None outside Slurm unless MMHPC_URL_FILE is set."""
    if env.get("MMHPC_URL_FILE"):
        return Path(env["MMHPC_URL_FILE"])
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return None
    return Path(env.get("SLURM_SUBMIT_DIR") or os.getcwd()) / f"mmhpc-{job_id}.url"


def public_url(url: str, env: Mapping[str, str] = os.environ) -> str:
    """A URL other machines can use: a wildcard bind address becomes this node's name."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host not in _ANY_HOST and f"[{host}]" not in _ANY_HOST:
        return url
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    netloc = f"{node}:{parts.port}" if parts.port else node
    return urlunsplit(parts._replace(netloc=netloc))


def parse_ready_line(text: str) -> str | None:
    """The URL of the first `mmhpc ready: URL` line in `text`, or None."""
    m = _READY_RE.search(text)
    return m.group(1) if m else None


def write_url_file(url: str, path: str | Path | None = None) -> Path | None:
    """Write `url` (made public) atomically to `path` or `url_file_path()`. Returns the path."""
    path = Path(path) if path is not None else url_file_path()
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(public_url(url) + "\n")
    os.replace(tmp, path)
    return path


def read_url_file(path: str | Path) -> str | None:
    try:
        text = Path(path).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return text or None


def wait_for_url(url_file: str | Path | None, logs: Iterable[str | Path] = (), *,
                 timeout_s: float = 1800.0, alive: Callable[[], bool] = lambda: True,
                 poll_s: float = 0.5) -> str:
    """Poll the URL file, then each log for the ready line, until found.

    Raises TimeoutError after `timeout_s`, RuntimeError once `alive()` says the job ended
    without becoming ready (checked after one more look, so a fast job is not missed).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        ended = not alive()
        url = read_url_file(url_file) if url_file else None
        if url:
            return url
        for log in logs:
            try:
                found = parse_ready_line(Path(log).read_text(errors="replace"))
            except FileNotFoundError:
                continue
            if found:
                return public_url(found)
        if ended:
            raise RuntimeError("the job ended before the server was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no `{READY_PREFIX.strip()}` line after {timeout_s:.0f} s")
        time.sleep(poll_s)


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(args: argparse.Namespace) -> int:
    try:
        url = wait_for_url(args.out, [args.log], timeout_s=args.timeout_s,
                           alive=lambda: _pid_alive(args.pid), poll_s=1.0)
    except (RuntimeError, TimeoutError) as e:
        print(f"mmhpc: no frontend URL: {e}", flush=True)
        return 1
    if read_url_file(args.out) is None:
        write_url_file(url, args.out)
    print(f"mmhpc: frontend URL {read_url_file(args.out)} (in {args.out})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmhpc.launch.url_file")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch", help="follow a job log for the ready line; write the URL file")
    w.add_argument("--log", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--pid", type=int, help="stop when this process (srun) has ended")
    w.add_argument("--timeout-s", type=float, default=7 * 24 * 3600.0)
    args = p.parse_args(argv)
    return _watch(args)


if __name__ == "__main__":
    sys.exit(main())

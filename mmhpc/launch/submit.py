"""Submit an mmhpc deployment to Slurm through submitit; print the job id and the frontend URL.

    python -m mmhpc.launch.submit cluster=h200 deployment=e_p_d model.path=/models/X \\
        submit.nodes=4 submit.partition=gpu

`submit.*` arguments are `SubmitOptions` fields; every other argument is a Hydra override for
`python -m mmhpc`. The job runs `srun --mpi=<submit.srun_mpi> python -u -m submitit.core._submit`
on every rank, which calls `ServeTask(overrides)`: the same `python -m mmhpc` as slurm/serve.sbatch.
Ctrl-C cancels the job (SIGTERM: the server drains). From Python:

    job, url = submit(["deployment=e_p_d", "model.path=/models/X"], nodes=4)
"""
from __future__ import annotations

import atexit
import dataclasses
import gc
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmhpc.launch.url_file import wait_for_url, write_url_file

PREFIX = "submit."


@dataclass
class SubmitOptions:
    """sbatch parameters; None takes the value from the composed config (cluster, deployment)."""
    folder: str = "slurm_logs"         # submitit's logs and pickles; the URL file goes here too
    nodes: int | None = None           # default: cluster.nodes
    tasks_per_node: int | None = None  # default: cluster.gpus_per_node, else the deployment's ranks
    gpus_per_node: int | None = None   # default: cluster.gpus_per_node (0: no --gpus-per-node)
    cpus_per_task: int | None = None
    timeout_min: int = 240
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "mmhpc"
    srun_mpi: str = "pmix"             # srun --mpi=...; pmi2 for PyPI MPICH
    python: str | None = None          # default: this interpreter
    ready_timeout_s: float = 3600.0
    detach: bool = False               # CLI: exit once the URL is printed (else wait; Ctrl-C cancels)
    extra: dict[str, Any] = field(default_factory=dict)   # more #SBATCH --key=value

    def __post_init__(self) -> None:
        for name in ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task"):
            v = getattr(self, name)
            if v is not None and v < (0 if name == "gpus_per_node" else 1):
                raise ValueError(f"submit.{name} must be positive, got {v}")


@dataclass
class ServeTask:
    """What every rank runs inside submitit: `python -m mmhpc OVERRIDES`, in this process."""
    overrides: list[str]

    def __call__(self) -> None:
        # submitit ignores SIGTERM ("bypass") and requeues on USR2; a server drains on SIGTERM
        # and is never requeued, so give the default/ mmhpc's own handlers back.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR2, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        from mmhpc.launch.main import main
        sys.argv = ["mmhpc", *self.overrides]
        rc = main(list(self.overrides))
        if rc:                    # submitit would lose the result of a bare sys.exit
            raise RuntimeError(f"mmhpc exited with {rc}")
        # At exit, after submitit saved the result: freeze the heap so that the interpreter's
        # final garbage collection is quick (see mmhpc.launch.main.exit_fast); a slow one
        # outlasted Slurm's KillWait after a drain on scancel.
        atexit.register(gc.freeze)


def split_args(argv: list[str]) -> tuple[list[str], SubmitOptions]:
    """`submit.key=value` arguments → SubmitOptions; the rest are mmhpc overrides."""
    overrides, opts = [], {}
    types = {f.name: f.type for f in dataclasses.fields(SubmitOptions)}
    for arg in argv:
        if not arg.startswith(PREFIX):
            overrides.append(arg)
            continue
        key, sep, value = arg[len(PREFIX):].partition("=")
        if key.startswith("extra."):
            opts.setdefault("extra", {})[key[len("extra."):]] = value
            continue
        if not sep or key not in types:
            raise SystemExit(f"bad {arg!r}: submit options are "
                             f"{', '.join(PREFIX + k + '=...' for k in types)}")
        opts[key] = _parse(value, str(types[key]))
    return overrides, SubmitOptions(**opts)


def _parse(value: str, type_name: str) -> Any:
    if value in ("null", "None"):
        return None
    if "bool" in type_name:
        return value.lower() in ("1", "true", "yes")
    if "int" in type_name:
        return int(value)
    if "float" in type_name:
        return float(value)
    return value


def sbatch_parameters(overrides: list[str], opts: SubmitOptions) -> dict[str, Any]:
    """Parameters of submitit's `_make_sbatch_string` for this deployment."""
    from mmhpc.launch.hydra import compose_config  # validates the overrides before submitting

    cfg = compose_config(overrides)
    gpus = cfg.cluster.gpus_per_node if opts.gpus_per_node is None else opts.gpus_per_node
    nodes = opts.nodes or cfg.cluster.nodes
    tasks = opts.tasks_per_node or gpus or -(-cfg.deployment.num_ranks // nodes)
    folder = str(Path(opts.folder).expanduser().absolute())
    params: dict[str, Any] = dict(
        job_name=opts.job_name, nodes=nodes, ntasks_per_node=tasks, time=opts.timeout_min,
        partition=opts.partition, account=opts.account, qos=opts.qos,
        constraint=opts.constraint, cpus_per_task=opts.cpus_per_task,
        gpus_per_node=gpus or None,
        srun_args=[f"--mpi={opts.srun_mpi}", "--kill-on-bad-exit=1"],
        setup=[f"export MMHPC_URL_FILE={shlex.quote(folder)}/mmhpc-$SLURM_JOB_ID.url"],
        signal_delay_s=120, additional_parameters=dict(opts.extra) or None,
    )
    return {k: v for k, v in params.items() if v is not None}


def sbatch_text(overrides: list[str], opts: SubmitOptions | None = None) -> str:
    """The submission script submitit would write (no Slurm needed): the golden-file test's text."""
    from submitit.slurm.slurm import _make_sbatch_string

    opts = opts or SubmitOptions()
    python = opts.python or shlex.quote(sys.executable)
    folder = Path(opts.folder).expanduser().absolute()
    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder / '%j'))}"
    return _make_sbatch_string(command=command, folder=folder / "%j",
                               **sbatch_parameters(overrides, opts))


def make_executor(overrides: list[str], opts: SubmitOptions) -> Any:
    import submitit

    ex = submitit.SlurmExecutor(folder=Path(opts.folder) / "%j", max_num_timeout=0,
                                python=opts.python)
    ex.update_parameters(**sbatch_parameters(overrides, opts))
    return ex


def url_file_of(job: Any, opts: SubmitOptions) -> Path:
    return Path(opts.folder).expanduser().absolute() / f"mmhpc-{job.job_id}.url"


def job_state(job_id: str) -> str:
    """The job's state from squeue/scontrol (sacct may be off); "" when Slurm no longer knows it."""
    r = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)],
                       capture_output=True, text=True)
    for word in r.stdout.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return ""


def is_running(job_id: str) -> bool:
    return job_state(job_id) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                                 "REQUEUED", "RESIZING")


def submit(overrides: list[str], opts: SubmitOptions | None = None, *, wait: bool = True,
           **options: Any) -> tuple[Any, str | None]:
    """Submit the deployment; with `wait`, block until the frontend is ready and return its URL.

    Raises RuntimeError (with the log's tail) when the job ends first, TimeoutError after
    `ready_timeout_s`; the job is cancelled in both cases.
    """
    opts = dataclasses.replace(opts or SubmitOptions(), **options)
    job = make_executor(overrides, opts).submit(ServeTask(list(overrides)))
    if not wait:
        return job, None
    return job, wait_ready(job, opts)


def wait_ready(job: Any, opts: SubmitOptions) -> str:
    url_file = url_file_of(job, opts)
    try:
        url = wait_for_url(url_file, [job.paths.stdout], timeout_s=opts.ready_timeout_s,
                           alive=lambda: is_running(job.job_id))
    except (RuntimeError, TimeoutError) as e:
        job.cancel(check=False)
        raise type(e)(f"job {job.job_id}: {e}\n{_tail(job.paths.stderr)}{_tail(job.paths.stdout)}")
    if not url_file.exists():
        write_url_file(url, url_file)
    return url


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()[-n:]
    except FileNotFoundError:
        return ""
    return f"--- {path}\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    overrides, opts = split_args(sys.argv[1:] if argv is None else argv)
    job = None
    try:
        job, _ = submit(overrides, opts, wait=False)
        print(f"mmhpc: submitted job {job.job_id} (logs: {job.paths.stdout})", flush=True)
        url = wait_ready(job, opts)
        print(f"mmhpc: frontend URL {url} (in {url_file_of(job, opts)})", flush=True)
        if opts.detach:
            print(f"mmhpc: stop with: scancel {job.job_id}")
            return 0
        print("mmhpc: serving; Ctrl-C cancels the job", flush=True)
        while is_running(job.job_id):
            time.sleep(5)
        print(f"mmhpc: job {job.job_id} ended: {job_state(job.job_id) or 'gone'}")
        return 0
    except KeyboardInterrupt:
        if job is not None:
            job.cancel(check=False)
            print(f"\nmmhpc: cancelled job {job.job_id}", flush=True)
        return 130
    except (RuntimeError, TimeoutError, ValueError) as e:
        print(f"mmhpc: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

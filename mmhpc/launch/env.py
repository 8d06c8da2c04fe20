"""Where this process sits in the job, read from the launcher's environment through ONE map.

Launchers are tried in `_LAUNCHERS` order: the process launcher that started us (Open MPI,
MPICH/Hydra or Cray PMI, PMIx) wins over Slurm, because `mpirun` inside an `sbatch` script
inherits the batch step's stale SLURM_PROCID=0. Slurm values are then used only to fill what
the launcher left out, and only where SLURM_PROCID agrees with the launcher's rank (srun).
With mpi4py initialised, `JobEnv.from_mpi` takes rank/size from MPI and counts ranks per
node with `Split_type(COMM_TYPE_SHARED)`, which every MPI implements.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, replace
from typing import Any, Mapping

# launcher -> JobEnv field -> environment variables (first present wins)
_LAUNCHERS: dict[str, dict[str, tuple[str, ...]]] = {
    "openmpi": {
        "rank": ("OMPI_COMM_WORLD_RANK",),
        "world_size": ("OMPI_COMM_WORLD_SIZE",),
        "local_rank": ("OMPI_COMM_WORLD_LOCAL_RANK",),
        "ranks_per_node": ("OMPI_COMM_WORLD_LOCAL_SIZE",),
    },
    "mpich": {   # MPICH/Hydra, Intel MPI, Cray PMI, srun --mpi=pmi2
        "rank": ("PMI_RANK",),
        "world_size": ("PMI_SIZE",),
        "local_rank": ("MPI_LOCALRANKID", "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID"),
        "ranks_per_node": ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", "PALS_LOCAL_SIZE"),
    },
    "pmix": {    # srun --mpi=pmix, prterun
        "rank": ("PMIX_RANK",),
        "world_size": ("PMIX_SIZE",),
        "local_rank": ("PMIX_LOCAL_RANK",),
        "ranks_per_node": ("PMIX_LOCAL_SIZE",),
    },
    "slurm": {
        "rank": ("SLURM_PROCID",),
        "world_size": ("SLURM_NTASKS", "SLURM_NPROCS"),
        "local_rank": ("SLURM_LOCALID",),
        "ranks_per_node": ("SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"),
        "num_nodes": ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"),
        "node_index": ("SLURM_NODEID",),
        "nodelist": ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"),
        "gpus": ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"),
    },
}
_INT_FIELDS = ("rank", "world_size", "local_rank", "ranks_per_node", "num_nodes", "node_index")


@dataclass(frozen=True)
class JobEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ranks_per_node: int = 1
    num_nodes: int = 1
    node_index: int = 0
    node_name: str = "localhost"
    host_addr: str = "127.0.0.1"      # what other ranks and clients connect to
    host_via: str = "one node"        # how host_addr was chosen (mmhpc.launch.address)
    host_ifname: str = ""             # the interface that holds host_addr, when known
    launcher: str = "singleton"
    visible_gpus: tuple[str, ...] = ()   # CUDA_VISIBLE_DEVICES (or SLURM_STEP_GPUS)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None,
                     hostname: str | None = None, host_addr: str | None = None,
                     interface: str = "") -> "JobEnv":
        """`host_addr` (or MMHPC_HOST_ADDR) wins; else `interface` (cluster.interface) picks
        this node's address; else 127.0.0.1 on one node, the node's own address on several."""
        env = os.environ if environ is None else environ
        vals, launcher = _read(env)
        ws = vals.get("world_size", 1)
        rpn = vals.get("ranks_per_node")
        nn = vals.get("num_nodes")
        if rpn is None:
            rpn = -(-ws // nn) if nn else ws
        if nn is None:
            nn = -(-ws // rpn)
        rank = vals.get("rank", 0)
        local = vals.get("local_rank", rank % rpn)
        node_index = vals.get("node_index", rank // rpn)
        node = hostname or env.get("SLURMD_NODENAME") or socket.gethostname()
        gpus = env.get("CUDA_VISIBLE_DEVICES")
        gpus = gpus if gpus is not None else vals.get("gpus", "")
        visible = tuple(g for g in str(gpus).split(",") if g.strip())
        addr, via, ifname = job_address(env, host_addr, interface, nn, node)
        return cls(rank=rank, world_size=ws, local_rank=local, ranks_per_node=rpn,
                   num_nodes=nn, node_index=node_index, node_name=node, host_addr=addr,
                   host_via=via, host_ifname=ifname, launcher=launcher, visible_gpus=visible)

    @classmethod
    def from_mpi(cls, comm: Any, environ: Mapping[str, str] | None = None,
                 host_addr: str | None = None, interface: str = "") -> "JobEnv":
        """MPI's own view (collective over `comm`): rank, size, ranks per node, node index;
        the address as in `from_environ`, for MPI's count of nodes."""
        from mpi4py import MPI
        base = cls.from_environ(environ, host_addr=host_addr or "127.0.0.1")
        shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
        local, rpn = shared.rank, shared.size
        leaders = comm.Split(0 if local == 0 else MPI.UNDEFINED, key=comm.rank)
        node_index, num_nodes = (leaders.rank, leaders.size) if local == 0 else (0, 0)
        if local == 0:
            leaders.Free()
        node_index, num_nodes = shared.bcast((node_index, num_nodes), root=0)
        shared.Free()
        # Nodes may run different rank counts; the layout needs the largest.
        rpn = comm.allreduce(rpn, op=MPI.MAX)
        env = os.environ if environ is None else environ
        addr, via, ifname = job_address(env, host_addr, interface, num_nodes, base.node_name)
        return replace(base, rank=comm.rank, world_size=comm.size, local_rank=local,
                       ranks_per_node=rpn, num_nodes=num_nodes, node_index=node_index,
                       host_addr=addr, host_via=via, host_ifname=ifname,
                       launcher="mpi" if base.launcher == "singleton" and comm.size > 1
                       else base.launcher)

    def device_index(self, gpus_per_node: int) -> int:
        """The CUDA device this rank drives (-1: CPU). With one visible GPU per rank
        (srun --gpus-per-task=1) that is 0, otherwise the local rank."""
        if gpus_per_node <= 0:
            return -1
        if len(self.visible_gpus) == 1:
            return 0
        return self.local_rank

    def __repr__(self) -> str:
        return (f"JobEnv(rank={self.rank}({self.world_size}) local={self.local_rank}"
                f"({self.ranks_per_node}) node={self.node_index}({self.num_nodes}) "
                f"{self.node_name}@{self.host_addr} via {self.launcher})")


def _read(env: Mapping[str, str]) -> tuple[dict[str, Any], str]:
    vals: dict[str, Any] = {}
    launcher = "singleton"
    for name, fields in _LAUNCHERS.items():
        got = {f: env[v] for f, names in fields.items() for v in names[::-1] if v in env}
        if "rank" not in got:
            continue
        if launcher == "singleton":
            launcher = name
        elif name == "slurm" and str(got["rank"]) != str(vals.get("rank")):
            continue     # stale batch-step Slurm values under mpirun
        for f, v in got.items():
            if f in vals:
                continue
            vals[f] = _parse(f, v)
    # SLURM_TASKS_PER_NODE may list several counts; pick this node's when we know it
    if isinstance(vals.get("ranks_per_node"), list):
        counts = vals["ranks_per_node"]
        vals["ranks_per_node"] = max(counts)
    return vals, launcher


def _parse(f: str, v: str) -> Any:
    if f == "ranks_per_node" and not v.strip().isdigit():
        return parse_tasks_per_node(v)
    if f in _INT_FIELDS:
        return int(v)
    return v


def parse_tasks_per_node(s: str) -> list[int]:
    """Slurm's compressed counts: '4(x2),3' -> [4, 4, 3]."""
    out: list[int] = []
    for part in s.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot parse SLURM_TASKS_PER_NODE={s!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def job_address(env: Mapping[str, str], host_addr: str | None, interface: str, num_nodes: int,
                node: str) -> tuple[str, str, str]:
    """(address, how it was chosen, its interface name or "")."""
    if host_addr:
        return host_addr, "cluster.host_addr", ""
    if env.get("MMHPC_HOST_ADDR"):
        return env["MMHPC_HOST_ADDR"], "MMHPC_HOST_ADDR", ""
    from mmhpc.launch.address import node_address
    got = node_address(interface, node, single_node=num_nodes == 1)
    return got.addr, f"{got.interface}, {got.how}" if got.interface else got.how, got.interface


def use_interface(job: "JobEnv", environ=os.environ) -> dict[str, str]:
    """On several nodes (or a chosen interface), point gloo's and NCCL's sockets at the
    interface that holds this node's address, where the user set nothing; returns what was set.
    (gloo otherwise binds the address the hostname resolves to, which may be none.)"""
    if not job.host_ifname or (job.num_nodes == 1 and job.host_ifname == "lo"):
        return {}
    set_ = {}
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if key not in environ:
            environ[key] = set_[key] = job.host_ifname
    return set_

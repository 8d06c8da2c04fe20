"""One TP instance's torch.distributed group, made from addresses exchanged over MPI.

Each process belongs to at most one TP instance, so the instance is the process's default
torch.distributed world: `init_tp_group` splits the MPI communicator by instance, rank-in-
instance 0 starts the TCPStore listening on a port the kernel gives it (and keeps: never
bind-0-and-release, a race), broadcasts `host:port` over MPI, and every member calls
`init_process_group` with that store (NCCL on CUDA, gloo on CPU). A gloo `cpu_group` carries the step
broadcasts on every device (no GPU spin while a server idles; pickled objects stay on host).

`get_tp()` is the process's current group; parallel layers read it when they are BUILT, so
`set_tp(TPGroup(rank, size))` with no process group is enough to build (and load) one shard.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

# A collective that does not complete within this (timeouts.collective_s) raises: a stuck or
# dead peer. Followers idle inside a broadcast while the server has nothing to do, so an idle
# leader broadcasts KEEPALIVE every quarter of it (`keep_alive`).
COLLECTIVE_TIMEOUT_S = 600.0
KEEPALIVE = "mmhpc-keepalive"
STORE_TIMEOUT = timedelta(minutes=10) # members joining the store (model loads come after)


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    group: Any = None                 # device collectives (NCCL / gloo); None: default world
    cpu_group: Any = None             # gloo: step broadcasts
    device: str = "cpu"
    initialized: bool = field(default=False, repr=False)
    ep: int = 1                       # expert-parallel groups (MoE layers; see models/moe.py)
    timeout_s: float = COLLECTIVE_TIMEOUT_S
    last_broadcast: float = field(default_factory=time.monotonic, repr=False)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        ep = f", ep={self.ep}" if self.ep > 1 else ""
        return f"TPGroup(rank={self.rank}/{self.size}{ep}, device={self.device})"

    # ---- collectives (no-ops at size 1) --------------------------------------------------
    def all_reduce(self, x):
        if self.size > 1:
            import torch.distributed as dist
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x):
        """[..., n] on every rank → [..., size * n] (rank order)."""
        if self.size == 1:
            return x
        import torch
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def all_to_all(self, x, out_splits: list[int] | None = None,
                   in_splits: list[int] | None = None):
        """Rows of `x` [sum(in_splits), ...] to the ranks (in_splits[j] rows to rank j); returns
        [sum(out_splits), ...] (out_splits[j] rows from rank j). No splits: equal shares."""
        import torch
        import torch.distributed as dist
        rows = sum(out_splits) if out_splits is not None else x.shape[0]
        out = torch.empty((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)
        return out

    def all_gather_rows(self, x, total: int):
        """Each rank's share x [<= ceil(total / size), ...] (rank order) -> [total, ...]."""
        import torch
        import torch.distributed as dist
        share = -(-total // self.size)
        if x.shape[0] < share:
            x = torch.cat([x, x.new_zeros((share - x.shape[0],) + tuple(x.shape[1:]))])
        out = x.new_empty((share * self.size,) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.group)
        return out[:total]

    def broadcast_object(self, obj: Any = None) -> Any:
        """The leader's `obj` on every rank (over the gloo cpu group)."""
        if self.size == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        self.last_broadcast = time.monotonic()
        return box[0]

    def keep_alive(self) -> None:
        """Leader, from the thread that runs the steps, whenever idle: a KEEPALIVE broadcast
        when none went out for a quarter of the collective timeout (followers skip it)."""
        if self.size > 1 and self.is_leader and \
                time.monotonic() - self.last_broadcast > self.timeout_s / 4:
            self.broadcast_object(KEEPALIVE)

    def min_int(self, value: int) -> int:
        if self.size == 1:
            return value
        import torch
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


_CURRENT = TPGroup()


def get_tp() -> TPGroup:
    return _CURRENT


def set_tp(tp: TPGroup) -> TPGroup:
    """Make `tp` the current group; returns the previous one."""
    global _CURRENT
    prev, _CURRENT = _CURRENT, tp
    return prev


def init_tp_group(comm, color: int, rank_in_instance: int, tp: int, host_addr: str,
                  device: str = "cpu", ep: int = 1,
                  timeout_s: float = COLLECTIVE_TIMEOUT_S) -> TPGroup:
    """Collective over `comm` (every rank calls it; `color` < 0: in no instance). Returns the
    rank's TPGroup (made current; `ep`: its expert-parallel groups); size 1 groups create no
    process group."""
    from mpi4py import MPI
    sub = comm.Split(color if color >= 0 else MPI.UNDEFINED, rank_in_instance)
    if sub == MPI.COMM_NULL or tp == 1:
        if sub != MPI.COMM_NULL:
            sub.Free()
        set_tp(TPGroup(device=device))
        return get_tp()
    assert sub.size == tp and sub.rank == rank_in_instance, (sub.size, tp, sub.rank)
    import torch
    import torch.distributed as dist
    store = dist.TCPStore(host_addr, 0, tp, True, timeout=STORE_TIMEOUT,
                          wait_for_workers=False) if sub.rank == 0 else None
    addr = sub.bcast((host_addr, store.port) if store else None, root=0)
    sub.Free()
    if store is None:
        store = dist.TCPStore(addr[0], addr[1], tp, False, timeout=STORE_TIMEOUT)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, store=store, world_size=tp, rank=rank_in_instance,
                            timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" \
        else dist.group.WORLD
    set_tp(TPGroup(rank_in_instance, tp, dist.group.WORLD, cpu_group, device, True, ep=ep,
                   timeout_s=timeout_s))
    return get_tp()


def destroy_tp_group() -> None:
    tp = get_tp()
    if tp.initialized:
        import torch.distributed as dist
        dist.destroy_process_group()
    set_tp(TPGroup())

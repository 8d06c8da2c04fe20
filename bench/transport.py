"""NIXL READ bandwidth/latency (DRAM, 4 KiB .. 64 MiB) and ZeroMQ round-trip latency between
two ranks.  Run: OMP_NUM_THREADS=1 mpirun -n 2 python bench/transport.py [--iters-scale X]

Rank 0 READs from rank 1's registered buffer through mmhpc.transport.NixlAgent (post + wait,
the path the roles use); ZMQ round trips are Heartbeat messages through two Mailboxes.
Prints a markdown table on rank 0.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
from mpi4py import MPI

import mmhpc.messages  # noqa: F401
from mmhpc.launch.env import JobEnv
from mmhpc.messages.common import Heartbeat
from mmhpc.transport.descs import NixlDescs
from mmhpc.transport.nixl_agent import NixlAgent
from mmhpc.transport.zmq_io import Mailbox

SIZES = [4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def main() -> None:
    scale = float(sys.argv[sys.argv.index("--iters-scale") + 1]) if "--iters-scale" in sys.argv \
        else 1.0
    comm = MPI.COMM_WORLD
    assert comm.size == 2, "run with mpirun -n 2"
    r = comm.rank
    job = JobEnv.from_mpi(comm)
    box = Mailbox(r, job.host_addr)
    agent = NixlAgent(f"bench{r}")
    pool = torch.ones(max(SIZES), dtype=torch.uint8) * (r + 1)
    desc = agent.register(pool)
    book = comm.allgather((box.address, agent.metadata(), desc))
    box.set_peers([b[0] for b in book])
    agent.add_peer(book[1 - r][1])
    comm.Barrier()

    rows = []
    if r == 0:
        remote = book[1][2]
        for size in SIZES:
            iters = max(3, int(scale * min(300, (256 << 20) // size)))
            local = NixlDescs(desc.agent, "DRAM", [[desc.regions[0][0], size, 0]])
            rem = NixlDescs(remote.agent, "DRAM", [[remote.regions[0][0], size, 0]])
            for _ in range(2):                                  # warm-up
                agent.wait(agent.read(local, rem), timeout=30)
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                agent.wait(agent.read(local, rem), timeout=30)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            rows.append((size, iters, med * 1e6, size / med / 2**30))
    comm.Barrier()

    # ZMQ round trip: rank 0 pings, rank 1 echoes
    n = max(50, int(1000 * scale))
    rtts = []
    for i in range(n + 20):
        if r == 0:
            t0 = time.perf_counter()
            box.send(1, Heartbeat(0, "ping", float(i)))
            box.recv(10)
            if i >= 20:
                rtts.append(time.perf_counter() - t0)
        else:
            src, msg = box.recv(10)
            box.send(0, Heartbeat(1, "pong", msg.time))
    comm.Barrier()
    if r == 0:
        print("| size | iters | READ latency (median) | bandwidth |")
        print("| ---: | ---: | ---: | ---: |")
        for size, iters, us, gibs in rows:
            label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
            print(f"| {label} | {iters} | {us:.1f} µs | {gibs:.2f} GiB/s |")
        rtts.sort()
        print(f"\nZMQ round trip (Heartbeat, msgpack, PUSH/PULL over tcp {job.host_addr}), "
              f"{n} trips: median {statistics.median(rtts) * 1e6:.1f} µs, "
              f"p99 {rtts[int(0.99 * (len(rtts) - 1))] * 1e6:.1f} µs")
    box.close()
    agent.close()


if __name__ == "__main__":
    main()

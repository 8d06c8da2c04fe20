"""What a role receives: the resolved config, where it runs, and its transports."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmhpc.config import Config
from mmhpc.launch.env import JobEnv
from mmhpc.launch.layout import Layout, RankInfo


@dataclass(frozen=True)
class Peer:
    """One rank's entry in the address book (exchanged by MPI allgather at start-up)."""
    rank: int
    role: str
    instance: int
    rank_in_instance: int
    address: str                # its ZeroMQ PULL socket (tcp://host:port)
    agent: str | None           # its NIXL agent name; None where it runs none (frontend)
    node_name: str


@dataclass
class RuntimeContext:
    """Everything a role's `setup(ctx)` / `run(ctx)` needs.

    `mailbox` is an AsyncMailbox (zmq.asyncio) on the rank that hosts the frontend and a
    thread-owned Mailbox elsewhere. `nixl` is None on a frontend-only rank or a 1-rank job.
    `peers` is empty during `setup` and filled before `run`. `comm` (mpi4py) is for start-up
    and shutdown only: no MPI collectives from run-time code.
    """
    config: Config
    job: JobEnv
    layout: Layout
    info: RankInfo
    mailbox: Any
    nixl: Any = None
    peers: list[Peer] = field(default_factory=list)
    comm: Any = None

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def role(self) -> str:
        return self.info.role

    @property
    def device(self) -> str:
        return "cpu" if self.info.device < 0 else f"cuda:{self.info.device}"

    def agent_of(self, rank: int) -> str:
        agent = self.peers[rank].agent
        if agent is None:
            raise KeyError(f"rank {rank} runs no NIXL agent")
        return agent

    def instance_ranks(self, role: str | None = None, instance: int | None = None) -> list[int]:
        """The ranks of an instance (default: this rank's own)."""
        role = role or self.info.role
        inst = self.info.instance if instance is None else instance
        return self.layout.instances(role)[inst]

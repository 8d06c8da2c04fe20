"""Several nodes on one machine: each node a network namespace with its own address, and hydra
(MPICH's mpiexec) spreading ranks over them through tests/netns_ssh.

    cluster = NetnsCluster(num_nodes=2).start()   # root only; `NetnsUnavailable` otherwise
    proc = cluster.mpiexec(["-n", "4", "-ppn", "2", python, "-m", "mmhpc", ...])
    cluster.run(0, ["curl", ...])                 # a command on node 0
    cluster.stop()                                # kills what runs in the nodes, removes them

Network: a switch namespace holds a bridge; node i's `eth0` is one end of a veth pair whose
other end is on that bridge, with address 10.213.N.(i+1)/24 (N random per cluster). Nothing is
added to the machine's own network: every address and route lives inside the namespaces the
cluster made, and `stop()` deletes them (veths go with them). Each node runs its commands with
its own hostname (`nodeI`, a UTS namespace), IPC and (for hydra's proxy and its ranks) PID
namespace; the file system stays shared.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SSH = Path(__file__).with_name("netns_ssh")


class NetnsUnavailable(RuntimeError):
    """Not root, or no `ip`/`unshare`: the tests skip with this reason."""


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


@dataclass
class NetnsCluster:
    num_nodes: int = 2
    tag: str = field(default_factory=lambda: f"{random.randrange(16 ** 4):04x}")
    subnet: int = field(default_factory=lambda: random.randrange(1, 255))
    namespaces: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"mmhpc{self.tag}sw"

    def ns(self, i: int) -> str:
        return f"mmhpc{self.tag}n{i}"

    def addr(self, i: int) -> str:
        return f"10.213.{self.subnet}.{i + 1}"

    @property
    def cidr(self) -> str:
        return f"10.213.{self.subnet}.0/24"

    def hostname(self, i: int) -> str:
        return f"node{i}"

    def env(self) -> dict[str, str]:
        nodes = " ".join(f"{self.addr(i)}={self.ns(i)}={self.hostname(i)}"
                         for i in range(self.num_nodes))
        return {"MMHPC_NETNS_NODES": nodes}

    def start(self) -> "NetnsCluster":
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        for tool in ("ip", "unshare"):
            if not shutil.which(tool):
                raise NetnsUnavailable(f"no `{tool}` on this machine")
        try:
            self._make()
        except Exception:
            self.stop()
            raise
        return self

    def _make(self) -> None:
        _ip("netns", "add", self.switch)
        self.namespaces.append(self.switch)
        _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        for i in range(self.num_nodes):
            ns, port = self.ns(i), f"mh{self.tag}p{i}"
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            # made in the switch namespace: no interface ever appears in the machine's own
            _ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ns=self.switch)
            _ip("link", "set", port, "master", "br0", "up", ns=self.switch)
            _ip("addr", "add", f"{self.addr(i)}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)

    def command(self, i: int, argv: list[str]) -> list[str]:
        """`argv` as run on node i: its network, hostname and IPC namespaces (the process keeps
        its pid, so signals reach it; tests/netns_ssh also gives each node's proxy and ranks
        their own PID namespace, so UCX sees no shared-memory path between nodes)."""
        return ["ip", "netns", "exec", self.ns(i), "unshare", "--uts", "--ipc", "bash", "-c",
                'hostname "$0" && exec "$@"', self.hostname(i), *argv]

    def run(self, i: int, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(i, argv), capture_output=True, text=True, **kw)

    def mpiexec(self, args: list[str], mpiexec: str, **popen) -> subprocess.Popen:
        """hydra started on node 0, its proxies on every node through tests/netns_ssh (hosts:
        the nodes' addresses unless `args` name them, by address or `nodeI`)."""
        hosts = [] if "-hosts" in args else \
            ["-hosts", ",".join(self.addr(i) for i in range(self.num_nodes))]
        argv = [mpiexec, "-localhost", self.addr(0), "-launcher", "ssh", "-launcher-exec",
                str(SSH), *hosts, *args]
        env = dict(popen.pop("env", os.environ), **self.env())
        return subprocess.Popen(self.command(0, argv), env=env, **popen)

    def pids(self, i: int) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.ns(i)], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]

    def kill_node(self, i: int) -> list[int]:
        """A node's death: SIGKILL every process in its namespace, at once."""
        pids = self.pids(i)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def stop(self) -> None:
        for ns in self.namespaces:
            if ns != self.switch:
                for _ in range(50):
                    if not self.kill_node(self.namespaces.index(ns) - 1):
                        break
                    time.sleep(0.1)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()

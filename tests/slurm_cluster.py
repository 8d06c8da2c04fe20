"""A throw-away single-node Slurm on 127.0.0.1 for the `slurm` tests.

`SlurmCluster.start(root)` installs slurm-wlm + munge with apt-get when they are missing, writes
a slurm.conf, a munge key, state/spool/log dirs under `root`, starts munged, slurmctld and slurmd
on free ports, and waits until the node is idle. Nothing under /etc is written: every client
reads the generated config through `SLURM_CONF` (exported by `env()`/`activate()`).
`stop()` ends the daemons it started, by pid. With `netns` (a started tests/netns_cluster.py
NetnsCluster) it is a Slurm of several nodes instead: slurmd I runs in node I's namespace (its
address, hostname, PID and IPC namespaces), slurmctld on node 0, and clients must run there too
(`client(argv)`). Use through the `slurm_cluster` fixture (tests/test_slurm.py) or by hand:

    python tests/slurm_cluster.py /tmp/slurm   # starts one and prints the `export SLURM_CONF=...`
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun")
KILL_WAIT_S = 15      # SIGTERM -> SIGKILL on scancel: the drain's deadline
NUM_CPUS = 8          # advertised to Slurm (config_overrides): more tasks than the host has cores


class SlurmUnavailable(RuntimeError):
    """Slurm is missing and cannot be installed here (the tests skip with this reason)."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin")


def ensure_installed() -> None:
    """apt-get install slurm-wlm and munge, only if a daemon or client is missing."""
    if all(_which(d) for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm/munge not installed and not root (cannot apt-get)")
    if not _which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge not installed and no apt-get on this machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    for attempt in range(3):  # another apt may hold the lock; the package list may be stale
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode == 0 and all(_which(d) for d in DAEMONS):
            return
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        time.sleep(2 * attempt)
    raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed:\n{r.stderr[-2000:]}")


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range. A port the kernel hands out (bind to
    0) is one it may hand out again: a job's own ZeroMQ and NIXL sockets took one such port
    before its HTTP server bound it ("address already in use" in a slow-tier run)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = max(low, 2048)
    for _ in range(200):
        port = random.randrange(low // 2, low)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in [{low // 2}, {low})")


@dataclass
class SlurmCluster:
    root: Path
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: dict[str, int] = field(default_factory=dict)   # daemon -> pid
    netns: Any = None                  # a NetnsCluster: one slurmd per namespace node

    @property
    def nodes(self) -> list[tuple[str, str]]:
        """(name, address) of every node."""
        if self.netns is None:
            return [(self.node, "127.0.0.1")]
        return [(self.netns.hostname(i), self.netns.addr(i)) for i in range(self.netns.num_nodes)]

    def client(self, argv: list[str]) -> list[str]:
        """`argv` where the cluster's clients run (node 0's namespace for a netns cluster)."""
        return argv if self.netns is None else self.netns.command(0, argv)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (sbatch, srun, squeue, submitit) of this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def log(self, daemon: str) -> str:
        path = self.root / "log" / f"{daemon}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    # ---- set-up ---------------------------------------------------------------------------
    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "run", "munge",
                  *(f"spool/slurmd-{name}" for name, _ in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        ctld_port, slurmd_port = free_port(), free_port()
        # Fresh job ids per cluster: MPICH names its shared-memory segment after the PMI job
        # id, so a segment leaked by an earlier cluster's job 1 would break this one's job 1.
        first_job_id = random.randint(1000, 60_000_000)
        nodes = "\n".join(f"NodeName={name} NodeAddr={addr} CPUs={NUM_CPUS} State=UNKNOWN"
                          for name, addr in self.nodes)
        self.conf.write_text(f"""\
# generated by tests/slurm_cluster.py
ClusterName=mmhpctest
FirstJobId={first_job_id}
SlurmctldHost={self.nodes[0][0]}({self.nodes[0][1]})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait={KILL_WAIT_S}
MinJobAge=600
InactiveLimit=0
MessageTimeout=20
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, **self.env()), start_new_session=True)
        self.procs[name] = p.pid

    def start(self, timeout_s: float = 60.0) -> "SlurmCluster":
        ensure_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config()
        m = self.root / "munge"
        self._spawn("munged", [_which("munged") or "munged", "--foreground", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={m}/munge.key",
                               f"--pid-file={m}/munged.pid", f"--log-file={self.root}/log/munged.log",
                               f"--seed-file={m}/munged.seed"])
        self._wait(lambda: self.munge_socket.exists(), 10, "munged")
        # -D: foreground (we hold the pid); -i: ignore saved state; -c: clean start
        self._spawn("slurmctld", self.client([_which("slurmctld") or "slurmctld", "-D", "-i",
                                              "-c", "-f", str(self.conf)]))
        for i, (name, _) in enumerate(self.nodes):
            slurmd = [_which("slurmd") or "slurmd", "-D", "-f", str(self.conf), "-N", name]
            if self.netns is not None:   # the node's own PID namespace, as tests/netns_ssh
                # nsenter, not `ip netns exec`: that remounts /sys, and slurmd needs the cgroups
                slurmd = ["nsenter", f"--net=/var/run/netns/{self.netns.ns(i)}", "unshare",
                          "--uts", "--ipc", "--pid", "--fork", "--mount-proc", "--kill-child", "bash", "-c",
                          'hostname "$0" && exec "$@"', name, *slurmd]
            self._spawn("slurmd" if i == 0 else f"slurmd{i}", slurmd)
        self._wait(self._node_idle, timeout_s, "slurmd/slurmctld (node idle)")
        return self

    def _node_idle(self) -> bool:
        r = subprocess.run(self.client(["sinfo", "-h", "-N", "-o", "%T"]), capture_output=True,
                           text=True, env=dict(os.environ, **self.env()))
        states = [st.rstrip("*") for st in r.stdout.split()]
        return r.returncode == 0 and len(states) == len(self.nodes) and \
            all(st in ("idle", "mixed", "allocated") for st in states)

    def _wait(self, ok, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ok():
                return
            for name, pid in self.procs.items():
                if _exited(pid):
                    raise RuntimeError(f"{name} exited during start-up:\n{self.log(name)}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.log('slurmctld')}\n"
                           f"{self.log('slurmd')}")

    def activate(self) -> None:
        """Point this process's Slurm clients (and its children) at the cluster."""
        os.environ.update(self.env())

    def stop(self) -> None:
        """Cancel what is left and wait for it (slurmd must outlive its steps, or they linger),
        stop slurmd, slurmctld, munged (by pid, TERM then KILL), then any orphaned process of
        this cluster (one whose environment names our slurm.conf)."""
        env = dict(os.environ, **self.env())
        if "slurmctld" in self.procs and not _exited(self.procs["slurmctld"]):
            subprocess.run(self.client(["scancel", "--full", "-u", "root"]), capture_output=True,
                           env=env, timeout=30)
            deadline = time.monotonic() + KILL_WAIT_S + 20
            while time.monotonic() < deadline:
                r = subprocess.run(self.client(["squeue", "-h", "-o", "%i"]), capture_output=True,
                                   text=True, env=env, timeout=30)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        for name in [d for d in self.procs if d.startswith("slurmd")] + ["slurmctld", "munged"]:
            pid = self.procs.pop(name, None)
            if pid is not None:
                _terminate(pid, wait=True)
        for pid in _processes_with_env(f"SLURM_CONF={self.conf}"):
            _terminate(pid, wait=False)


def _terminate(pid: int, wait: bool) -> None:
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while wait and not _exited(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal(pid, signal.SIGKILL if wait else signal.SIGTERM)
    if wait:
        _exited(pid)


def _processes_with_env(entry: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if entry.encode() in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except OSError:
            continue
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _exited(pid: int) -> bool:
    """True when our child `pid` has exited (reaping it)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


if __name__ == "__main__":
    c = SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mmhpc-slurm")).start()
    print(f"export SLURM_CONF={c.conf}   # daemons: {c.procs}")
    print("Ctrl-C stops the cluster")
    try:
        signal.pause()
    except KeyboardInterrupt:
        c.stop()

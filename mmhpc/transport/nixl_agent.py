"""A NIXL agent with deadlines: register pools, exchange metadata, READ from peers.

Protocol: register every pool a peer may read (KV cache, embedding buffer) BEFORE taking
`metadata()`; memory registered later is unknown to peers that loaded the earlier metadata
(re-publish `metadata()`, then peers call `add_peer` again). A transfer
is posted by `read`/`write` and completed by `wait(handle, timeout)` (raises TimeoutError and
releases the request, never waits forever) or polled with `done(handle)`. The remote side
learns completion through the `notif` bytes (`get_notifs()`).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from mmhpc.transport.descs import NixlDescs


class NixlError(RuntimeError):
    pass


# The UCX progress thread (needed: the target of a READ over tcp / shm emulation must progress)
# sleeps in poll() on the UCX worker's event fd with this timeout. The Python binding hard-codes
# 0, i.e. a thread spinning on a core per agent even when idle; events still wake it at once.
PROGRESS_WAIT_US = 100_000
_patch_lock = threading.Lock()


@contextlib.contextmanager
def _progress_wait(wait_us: int):
    """Make `nixl_agent(...)` build its config with pthrDelay = wait_us (the binding sets 0)."""
    import nixl._api as api
    base = api.nixlBind.nixlAgentConfig

    class _Config(base):
        pthrDelay = property(lambda self: base.pthrDelay.__get__(self),
                             lambda self, _v: base.pthrDelay.__set__(self, wait_us))

    with _patch_lock:
        api.nixlBind.nixlAgentConfig = _Config
        try:
            yield
        finally:
            api.nixlBind.nixlAgentConfig = base


@dataclass
class XferHandle:
    handle: Any
    peer: str
    op: str
    nbytes: int
    started: float


class NixlAgent:
    def __init__(self, name: str, backend: str = "UCX", num_threads: int = 0,
                 progress_wait_us: int | None = None, vram: bool | None = None) -> None:
        import logging
        import os
        from nixl._api import nixl_agent, nixl_agent_config
        if "NIXL_LOG_LEVEL" not in os.environ:   # NIXL logs every agent at INFO
            logging.getLogger("nixl").setLevel(logging.WARNING)
        self.name = name
        self.backend = backend
        # UCX settings for VRAM pools (cuda_ipc GET on GPUs without NVLink), before the context
        from mmhpc.transport.ucx_env import apply_ucx_defaults, wants_vram
        self.ucx_defaults = apply_ucx_defaults(wants_vram() if vram is None else vram)
        conf = nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False,
                                 backends=[backend], num_threads=num_threads)
        if progress_wait_us is None:
            progress_wait_us = int(os.environ.get("MMHPC_NIXL_PROGRESS_WAIT_US", PROGRESS_WAIT_US))
        with _progress_wait(progress_wait_us):
            self._agent = nixl_agent(name, conf)
        if backend not in self._agent.backends:
            raise NixlError(f"NIXL backend {backend} unavailable "
                            f"(plugins: {self._agent.get_plugin_list()})")
        self._regs: list[tuple[Any, int, int, str]] = []   # (reg_descs, addr, nbytes, mem)
        self._published = False
        self._peers: dict[str, bool] = {}

    # -- memory ------------------------------------------------------------------------
    def register(self, tensor) -> NixlDescs:
        """Register a contiguous torch tensor (DRAM or VRAM) as a pool peers may read."""
        if self._published:
            raise NixlError(f"{self.name}: register pools before metadata() is exchanged "
                            f"(or re-publish metadata and have peers add_peer again)")
        desc = NixlDescs.of_tensor(self.name, tensor)
        reg = self._agent.register_memory(tensor, backends=[self.backend])
        addr, nbytes, _ = desc.regions[0]
        self._regs.append((reg, addr, nbytes, desc.mem_type))
        return desc

    def descs(self, tensor) -> NixlDescs:
        """Descriptors of a contiguous view inside a registered pool (for messages)."""
        d = NixlDescs.of_tensor(self.name, tensor)
        self._check_registered(d)
        return d

    def _check_registered(self, d: NixlDescs) -> None:
        for a, n, _ in d.regions:
            if not any(r_addr <= a and a + n <= r_addr + r_n and mem == d.mem_type
                       for _, r_addr, r_n, mem in self._regs):
                raise NixlError(f"{self.name}: region [{a:#x}, +{n}) is not in a registered pool")

    # -- metadata ----------------------------------------------------------------------
    def metadata(self) -> bytes:
        self._published = True
        return self._agent.get_agent_metadata()

    def allow_late_registration(self) -> None:
        """Accept `register` after metadata(); the caller re-publishes metadata afterwards."""
        self._published = False

    def add_peer(self, metadata: bytes) -> str:
        name = self._agent.add_remote_agent(metadata)
        name = name.decode() if isinstance(name, bytes) else name
        self._peers[name] = True
        return name

    def remove_peer(self, name: str) -> None:
        if self._peers.pop(name, None):
            self._agent.remove_remote_agent(name)

    @property
    def peers(self) -> list[str]:
        return list(self._peers)

    # -- transfers ---------------------------------------------------------------------
    def read(self, local: NixlDescs, remote: NixlDescs, notif: bytes = b"") -> XferHandle:
        """Post a READ of `remote` (peer memory) into `local` (registered here)."""
        return self._post("READ", local, remote, notif)

    def write(self, local: NixlDescs, remote: NixlDescs, notif: bytes = b"") -> XferHandle:
        return self._post("WRITE", local, remote, notif)

    def _post(self, op: str, local: NixlDescs, remote: NixlDescs, notif: bytes) -> XferHandle:
        if remote.agent not in self._peers:
            raise NixlError(f"{self.name}: unknown peer {remote.agent!r} (add_peer first)")
        if [n for _, n, _ in local.regions] != [n for _, n, _ in remote.regions]:
            raise NixlError(f"{op}: local and remote region sizes differ "
                            f"({local.nbytes} vs {remote.nbytes} bytes)")
        self._check_registered(local)
        a = self._agent
        ldl = a.get_xfer_descs(local.tuples(), local.mem_type)
        rdl = a.get_xfer_descs(remote.tuples(), remote.mem_type)
        h = a.initialize_xfer(op, ldl, rdl, remote.agent, notif, backends=[self.backend])
        state = a.transfer(h)
        if state == "ERR":
            h.release()
            raise NixlError(f"{op} from {remote.agent} ({local.nbytes} bytes) failed to post")
        return XferHandle(h, remote.agent, op, local.nbytes, time.monotonic())

    def done(self, x: XferHandle) -> bool:
        state = self._agent.check_xfer_state(x.handle)
        if state == "ERR":
            self.release(x)
            raise NixlError(f"{x.op} from {x.peer} ({x.nbytes} bytes) failed")
        if state == "DONE":
            self.release(x)
            return True
        return False

    def wait(self, x: XferHandle, timeout: float, spin_s: float = 0.0002) -> None:
        """Until `x` completes; TimeoutError after `timeout` seconds (the request is released)."""
        deadline = time.monotonic() + timeout
        while not self.done(x):
            now = time.monotonic()
            if now > deadline:
                self.release(x)
                raise TimeoutError(f"NIXL {x.op} from {x.peer} of {x.nbytes} bytes not done "
                                   f"after {timeout:.3g}s")
            # spin briefly (small transfers finish in µs), then yield the CPU
            if now - x.started > spin_s:
                time.sleep(0.0002)

    def release(self, x: XferHandle) -> None:
        """Give up a transfer (done or not): NIXL frees it; bytes may still land after."""
        if x.handle is not None:
            try:
                x.handle.release()
            except Exception:   # an active transfer may refuse to cancel; NIXL frees it later
                pass
            x.handle = None

    # -- notifications -----------------------------------------------------------------
    def get_notifs(self) -> dict[str, list[bytes]]:
        """New notifications since the last call: {peer agent name: [message, ...]}."""
        return {k: list(v) for k, v in self._agent.get_new_notifs().items() if v}

    def send_notif(self, peer: str, msg: bytes) -> None:
        self._agent.send_notif(peer, msg)

    def close(self) -> None:
        for name in list(self._peers):
            try:
                self.remove_peer(name)
            except Exception:
                pass
        for reg, *_ in self._regs:
            try:
                self._agent.deregister_memory(reg, backends=[self.backend])
            except Exception:
                pass
        self._regs.clear()

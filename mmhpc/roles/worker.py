"""What every worker role shares: an I/O thread that owns the Mailbox, and the loop protocol.

    I/O thread:   Mailbox.recv → inbox queue;  outbox queue → Mailbox.send;  Heartbeat to the
                  frontend every timeouts.heartbeat_s (with the loop's latest `stats`).
    engine loop:  drain inbox → role.handle(src, msg) → role.tick() (transfers, engine.step,
                  deadlines, leases) → sends go to the outbox. No sockets in the loop.
A `Shutdown` message (or the I/O thread dying) ends both.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

from mmhpc.messages.common import Heartbeat, Shutdown
from mmhpc.transport.zmq_io import PeerUnavailable

log = logging.getLogger(__name__)
IO_POLL_S = 0.001


class Worker:
    """Base of the encode / prefill / decode roles: subclasses implement handle() and tick()."""

    def __init__(self, ctx) -> None:
        if ctx.info.hosts_frontend:
            raise RuntimeError(f"{ctx.info.role} beside the frontend on rank 0 is not supported "
                               f"yet: set deployment.frontend_shares_rank=false")
        self.ctx = ctx
        self.rank = ctx.rank
        self.timeouts = ctx.config.timeouts
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.stats: dict[str, Any] = {}

    # -- loop side
    def send(self, dest: int, msg: Any) -> None:
        self.outbox.put((dest, msg))

    def busy(self) -> bool:
        """True while there is work that needs tick() without new messages."""
        return False

    def handle(self, src: int, msg: Any) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the role holds (called once the loop ends)."""

    def run(self) -> None:
        io = threading.Thread(target=self._io, name=f"mmhpc-io-r{self.rank}", daemon=True)
        io.start()
        try:
            while not self.stopping.is_set():
                try:
                    item = self.inbox.get(timeout=0 if self.busy() else 0.01)
                except queue.Empty:
                    item = None
                while item is not None:
                    src, msg = item
                    try:
                        self.handle(src, msg)
                    except Exception:  # noqa: BLE001 - one bad message must not stop the rank
                        log.exception("rank %d: handling %s failed", self.rank, type(msg).__name__)
                    try:
                        item = self.inbox.get_nowait()
                    except queue.Empty:
                        item = None
                self.tick()
        finally:
            self.stopping.set()
            self.close()
            io.join(5.0)

    # -- I/O thread
    def _io(self) -> None:
        mb = self.ctx.mailbox
        frontend = self.ctx.layout.frontend_rank
        next_beat = 0.0
        try:
            while not self.stopping.is_set():
                for src, msg in mb.recv_all(IO_POLL_S):
                    if isinstance(msg, Shutdown):
                        self.stopping.set()
                    self.inbox.put((src, msg))
                while True:
                    try:
                        dest, msg = self.outbox.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        mb.send(dest, msg)
                    except PeerUnavailable as e:
                        log.warning("rank %d: %s (dropped %s)", self.rank, e, type(msg).__name__)
                now = time.time()
                if now >= next_beat:
                    next_beat = now + self.timeouts.heartbeat_s
                    mb.send(frontend, Heartbeat(self.rank, self.ctx.role, now,
                                                dict(self.stats, pid=os.getpid())))
        except Exception:  # noqa: BLE001
            log.exception("rank %d: I/O thread failed", self.rank)
            self.stopping.set()


def stage_deadline(request_deadline: float, stage_s: float, start: float | None = None) -> float:
    """The earlier of the request's deadline and `stage_s` from `start` (now)."""
    return min(request_deadline, (start if start is not None else time.time()) + stage_s)

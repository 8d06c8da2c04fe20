"""What every worker role shares: an I/O thread that owns the Mailbox, and the loop protocol.
Nothing polls on a timer: both threads block until there is something to do.

    I/O thread:   blocks in zmq.Poller on (PULL socket, wake eventfd) until a message arrives,
                  the engine loop queued a send (it writes the eventfd), or the next Heartbeat
                  (every timeouts.heartbeat_s, with the loop's latest `stats`) is due.
                  Mailbox.recv → inbox queue;  outbox queue → Mailbox.send.
    engine loop:  drain inbox → role.handle(src, msg) → role.tick() (transfers, engine.step,
                  deadlines, leases) → sends go to the outbox. While the role has compute to do
                  (`busy()`) it does not wait; while it only waits for NIXL transfers
                  (`transfers_in_flight()`) it waits at most TRANSFER_POLL_S for a message;
                  otherwise it blocks on the inbox (HOUSEKEEPING_S bounds the wait so deadlines
                  and leases still expire). No sockets in the loop.
A `Shutdown` message (or the I/O thread dying) ends both.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

import zmq

from mmhpc.distributed.group import get_tp
from mmhpc.messages.common import Heartbeat, Shutdown
from mmhpc.messages.to_frontend import TokenStream
from mmhpc.transport.zmq_io import PeerUnavailable

log = logging.getLogger(__name__)
TRANSFER_POLL_S = 0.0002    # NIXL READs in flight: check them this often (µs-ms transfers)
HOUSEKEEPING_S = 0.1        # idle: wake this often for deadlines, leases and stats


class Worker:
    """Base of the encode / prefill / decode roles: subclasses implement handle() and tick()."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.rank = ctx.rank
        self.timeouts = ctx.config.timeouts
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.stopping = threading.Event()
        self.stats: dict[str, Any] = {}
        self.loop_at = time.monotonic()     # the engine loop's last turn (the I/O thread reports)
        self._streamed: set[str] = set()     # requests with an output from this rank's engine
        # stage counters, sent with every Heartbeat (mmhpc.server.metrics.RANK_SERIES)
        self.counts: dict[str, float] = dict.fromkeys(("num_step_errors", "step_s",
                                                       "num_steps"), 0)
        self._route = None              # beside the frontend: its router instead of the outbox

    # -- loop side
    def send(self, dest: int, msg: Any) -> None:
        if self._route is not None:
            self._route(dest, msg)
            return
        self.outbox.put((dest, msg))
        os.eventfd_write(self._wake_fd, 1)

    def busy(self) -> bool:
        """True while there is compute for tick() without new messages (never wait)."""
        return False

    def transfers_in_flight(self) -> bool:
        """True while NIXL transfers are posted and tick() must check them soon."""
        return False

    def handle(self, src: int, msg: Any) -> None:
        raise NotImplementedError

    def stream_step(self, engine, requests: dict, stage: str, error: str) -> None:
        """One `engine.step()`: each output goes to its request's frontend as a TokenStream
        (`stage`); finished requests leave `requests` (request id -> a message with
        `frontend_rank`). A step that raises fails its suspects alone (`self._fail(msg,
        f"{error}: ...")`, see `suspects`) and the rank goes on: the others are scheduled
        again by the next step."""
        t0 = time.perf_counter()
        try:
            outputs = engine.step()
        except Exception as e:  # noqa: BLE001 - fail the request(s) that broke it, keep the rank
            self.counts["num_step_errors"] += 1
            victims = suspects(e, requests, self._streamed)
            log.exception("%s rank %d: step failed; failing %s", stage, self.rank, victims)
            for rid in victims:
                self._streamed.discard(rid)
                self._fail(requests[rid], f"{error}: {type(e).__name__}: {e}")
            return
        finally:
            self.counts["step_s"] += time.perf_counter() - t0
            self.counts["num_steps"] += 1
        for out in outputs:
            msg = requests.get(out.request_id)
            if msg is None:
                continue
            self.send(msg.frontend_rank, TokenStream.of(out, stage))
            self._streamed.add(out.request_id)
            if out.finished:
                del requests[out.request_id]
                self._streamed.discard(out.request_id)
        if len(self._streamed) > 2 * len(requests) + 64:    # aborted ones
            self._streamed &= requests.keys()

    def tick(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the role holds (called once the loop ends)."""

    def _wait_s(self) -> float:
        if self.busy():
            return 0.0
        return TRANSFER_POLL_S if self.transfers_in_flight() else HOUSEKEEPING_S

    def run(self) -> None:
        _leave_signals_to_frontend(self.ctx.config.server.request_timeout_s + 15.0)
        self.tick()                     # `stats` for the first Heartbeat
        io = threading.Thread(target=self._io, name=f"mmhpc-io-r{self.rank}", daemon=True)
        io.start()
        try:
            self.loop()
        finally:
            self.stopping.set()
            os.eventfd_write(self._wake_fd, 1)
            self.close()
            io.join(5.0)
            os.close(self._wake_fd)

    def run_beside_frontend(self, route) -> None:
        """The loop in this thread (not the main one) of rank 0; the frontend owns the
        mailbox: it puts our messages in `inbox` and `route(dest, msg)` takes our sends."""
        self._route = route
        try:
            self.loop()
        finally:
            self.stopping.set()
            self.close()

    def loop(self) -> None:
        while not self.stopping.is_set():
            self.loop_at = time.monotonic()
            wait = self._wait_s()
            try:
                item = self.inbox.get_nowait() if wait == 0 else self.inbox.get(timeout=wait)
            except queue.Empty:
                item = None
            while item is not None:
                src, msg = item
                if isinstance(msg, Shutdown):
                    self.stopping.set()
                try:
                    self.handle(src, msg)
                except Exception:  # noqa: BLE001 - one bad message must not stop the rank
                    log.exception("rank %d: handling %s failed", self.rank, type(msg).__name__)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            self.tick()
            get_tp().keep_alive()           # TP leader, idle: the followers' collective lives

    # -- I/O thread
    def _io(self) -> None:
        mb = self.ctx.mailbox
        frontend = self.ctx.layout.frontend_rank
        poller = zmq.Poller()
        poller.register(mb.socket, zmq.POLLIN)
        poller.register(self._wake_fd, zmq.POLLIN)
        next_beat = 0.0
        try:
            while not self.stopping.is_set():
                now = time.time()
                if now >= next_beat:
                    next_beat = now + self.timeouts.heartbeat_s
                    stalled = max(0.0, time.monotonic() - self.loop_at - HOUSEKEEPING_S)
                    mb.send(frontend, Heartbeat(self.rank, self.ctx.role, now,
                                                dict(self.stats, pid=os.getpid(),
                                                     loop_stalled_s=round(stalled, 3),
                                                     instance=self.ctx.info.instance)))
                ready = dict(poller.poll(max(0, int((next_beat - time.time()) * 1000)) + 1))
                if ready.get(self._wake_fd):
                    try:
                        os.eventfd_read(self._wake_fd)
                    except BlockingIOError:
                        pass
                if ready.get(mb.socket):
                    for src, msg in mb.recv_all(0):
                        if isinstance(msg, Shutdown):
                            self.stopping.set()
                        self.inbox.put((src, msg))
                self._flush(mb)
            self._flush(mb)
        except Exception:  # noqa: BLE001
            log.exception("rank %d: I/O thread failed", self.rank)
            self.stopping.set()
            self.inbox.put((self.rank, Shutdown("I/O thread failed")))

    def _flush(self, mb) -> None:
        while True:
            try:
                dest, msg = self.outbox.get_nowait()
            except queue.Empty:
                return
            try:
                mb.send(dest, msg)
            except PeerUnavailable as e:
                log.warning("rank %d: %s (dropped %s)", self.rank, e, type(msg).__name__)


def suspects(exc: Exception, requests: dict, streamed: set[str]) -> list[str]:
    """The requests a failed step is blamed on: the one the exception names
    (`exc.request_id`), else those with no output yet (their new inputs: images, prompts),
    else all (a step over old requests only)."""
    rid = getattr(exc, "request_id", None)
    if rid in requests:
        return [rid]
    fresh = [r for r in requests if r not in streamed]
    return fresh or list(requests)


def run_worker(ctx) -> None:
    """A role's `run`: the worker's loop, or on rank 0 the frontend with the loop beside it."""
    if ctx.info.hosts_frontend:
        from mmhpc.roles import frontend
        frontend.run(ctx, local=ctx.worker)
    else:
        ctx.worker.run()


def _leave_signals_to_frontend(grace_s: float) -> None:
    """mpirun / srun send SIGTERM to every rank: the frontend drains its requests and then
    sends Shutdown, so a worker must not die first (the frontend would take its closed
    connection for a dead rank). If no Shutdown comes within `grace_s`, exit anyway."""
    import signal
    if threading.current_thread() is not threading.main_thread():
        return

    def on_signal(signum, _frame) -> None:
        timer = threading.Timer(grace_s, os._exit, (128 + signum,))
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def stage_deadline(request_deadline: float, stage_s: float, start: float | None = None) -> float:
    """The earlier of the request's deadline and `stage_s` from `start` (now)."""
    return min(request_deadline, (start if start is not None else time.time()) + stage_s)


def frontend_hashes(msg, engine) -> list[int] | None:
    """The prompt's block hashes the frontend sent with `msg` (PrefillRequest,
    GenerateRequest), if made at this engine's block size; None: the scheduler makes them."""
    if not msg.hash_block_size or msg.hash_block_size != engine.block_size:
        return None
    from mmhpc.engine.block_manager import unpack_hashes
    return unpack_hashes(msg.block_hashes)

"""ZeroMQ mailboxes: every rank binds one PULL socket; sending to a rank goes through a PUSH
socket connected to that rank's address (one per destination, made on first use).

Addresses are learnt at start-up (MPI allgather, see mmhpc.launch.main) and set with
`set_peers`. Frames are `codec.encode_envelope(src_rank, msg)`. PUSH/PULL keeps per-pair order
and reconnects on its own; `send` never blocks: a full queue (a dead or stuck peer) raises
`PeerUnavailable`. Sockets are not thread-safe: one thread owns a `Mailbox`; rank 0's asyncio
loop owns an `AsyncMailbox`.
"""
from __future__ import annotations

from typing import Any

import zmq
import zmq.asyncio

from mmhpc.transport import codec

SNDHWM = 10_000


class PeerUnavailable(RuntimeError):
    pass


class _Base:
    def __init__(self, rank: int, host: str = "127.0.0.1", port: int = 0,
                 ctx: zmq.Context | None = None) -> None:
        self.rank = rank
        self._ctx = ctx or self._new_context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        if port:
            self._pull.bind(f"tcp://{host}:{port}")
        else:
            port = self._pull.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._peers: dict[int, str] = {}
        self._push: dict[int, zmq.Socket] = {}

    def _new_context(self) -> zmq.Context:
        return zmq.Context()

    def set_peers(self, addresses: dict[int, str] | list[str]) -> None:
        self._peers = dict(enumerate(addresses)) if isinstance(addresses, list) \
            else dict(addresses)

    def _socket_to(self, dest: int) -> zmq.Socket:
        sock = self._push.get(dest)
        if sock is None:
            if dest not in self._peers:
                raise PeerUnavailable(f"rank {self.rank}: no address for rank {dest}")
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, SNDHWM)
            sock.connect(self._peers[dest])
            self._push[dest] = sock
        return sock

    def monitor(self, dest: int, events: int = zmq.EVENT_DISCONNECTED) -> zmq.Socket:
        """Connect to `dest` now and return a monitor socket of that PUSH socket (its events
        arrive as soon as the peer's process is gone: the kernel closes its connections)."""
        return self._socket_to(dest).get_monitor_socket(events)

    def _frame(self, msg: Any) -> bytes:
        return codec.encode_envelope(self.rank, msg)

    def close(self) -> None:
        for s in self._push.values():
            s.close(linger=0)
        self._pull.close(linger=0)
        self._push.clear()


class Mailbox(_Base):
    """Blocking/polling mailbox for worker threads."""

    def send(self, dest: int, msg: Any) -> None:
        try:
            self._socket_to(dest).send(self._frame(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise PeerUnavailable(f"rank {self.rank}: send queue to rank {dest} is full") from None

    def recv(self, timeout: float | None = None) -> tuple[int, Any] | None:
        """(src_rank, message), or None after `timeout` seconds (0: poll; None: wait)."""
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if not self._pull.poll(ms):
            return None
        return codec.decode_envelope(self._pull.recv(copy=True))

    def recv_all(self, timeout: float = 0.0) -> list[tuple[int, Any]]:
        """Everything queued now (waiting up to `timeout` for the first message)."""
        out = []
        first = self.recv(timeout)
        while first is not None:
            out.append(first)
            first = self.recv(0)
        return out

    @property
    def socket(self) -> zmq.Socket:
        """The PULL socket, to add to a zmq.Poller beside other sockets."""
        return self._pull


class AsyncMailbox(_Base):
    """asyncio mailbox (zmq.asyncio) for rank 0's event loop."""

    def _new_context(self) -> zmq.Context:
        return zmq.asyncio.Context()

    def send(self, dest: int, msg: Any) -> None:
        """Non-blocking: a PUSH with room queues at once (never awaits)."""
        self.send_frame(dest, self._frame(msg))

    def frame(self, msg: Any) -> bytes:
        """The wire form of `msg` from this rank: make a large one off the event loop (a
        worker thread) and `send_frame` it on the loop."""
        return self._frame(msg)

    def send_frame(self, dest: int, frame: bytes) -> None:
        try:
            self._socket_to(dest).send(frame, flags=zmq.NOBLOCK, copy=len(frame) < (1 << 16))
        except zmq.Again:
            raise PeerUnavailable(f"rank {self.rank}: send queue to rank {dest} is full") from None

    async def recv(self, timeout: float | None = None) -> tuple[int, Any] | None:
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if not await self._pull.poll(ms):
            return None
        return codec.decode_envelope(await self._pull.recv(copy=True))

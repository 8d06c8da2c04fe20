"""Which worker ranks are alive, as the frontend (rank 0) judges it: by progress, not by noise.

A rank is DEAD when
- its connection closes (a ZeroMQ monitor on the PUSH socket to it: the kernel closes a killed
  process's sockets at once, so the frontend knows within milliseconds), or
- it is silent (no Heartbeat from its I/O thread) for timeouts.dead_rank_s, or
- its I/O thread beats but its engine loop has not turned for timeouts.engine_stall_s (the
  heartbeat carries `loop_stalled_s`, measured on the rank itself): a stuck step, a hung
  collective.
It is STALLED (the frontend's /health answers 503, requests still wait) while it has been
silent for more than STALL_BEATS heartbeats, or its loop has not turned for dead_rank_s.

Silence is measured in the frontend's own time: when the frontend's event loop itself was
late (a burst of work on it), the lateness is not charged to the ranks: every rank's silence
clock is moved on by the stall, so a slow frontend cannot declare a healthy rank dead.
A death calls `on_dead(rank, why)` once; after it, `dead` holds the line that names it.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

import zmq

STALL_BEATS = 2.5           # heartbeats missed before a rank counts as stalled


class Liveness:
    def __init__(self, timeouts, roles: dict[int, str], workers: list[int],
                 on_dead: Callable[[int, str], None], names: dict[int, str] | None = None) -> None:
        """`names`: how a line names each rank (its role, "role on node" across nodes)."""
        self.timeouts = timeouts
        self.roles = roles
        self.names = names or roles
        self.workers = workers
        self.on_dead = on_dead
        self.last_seen: dict[int, float] = {}
        self.loop_stalled: dict[int, float] = {}        # rank -> its engine loop's age (s)
        self.dead: str | None = None
        self.closing = False
        self.num_frontend_stalls = 0
        self.frontend_stalled_s = 0.0
        self.max_frontend_stall_s = 0.0

    def start(self, mailbox) -> list[asyncio.Task]:
        now = time.monotonic()
        self.last_seen = {r: now for r in self.workers}
        return ([asyncio.ensure_future(self._monitor())]
                + [asyncio.ensure_future(self._watch(r, mailbox.monitor(r)))
                   for r in self.workers])

    # ---------------------------------------------------------------- events
    def heard(self, rank: int) -> None:
        self.last_seen[rank] = time.monotonic()

    def beat(self, rank: int, stats: dict) -> None:
        self.loop_stalled[rank] = float(stats.get("loop_stalled_s", 0.0))

    def rank_dead(self, rank: int, why: str) -> None:
        if self.dead or self.closing:
            return
        self.dead = f"rank {rank} ({self.names.get(rank, '?')}) is dead: {why}"
        self.on_dead(rank, self.dead)

    # ---------------------------------------------------------------- judgement
    def silent_s(self, rank: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return now - self.last_seen.get(rank, now)

    def stalled(self) -> list[str]:
        """Ranks that are late now (dead ones included): one line each, for /health."""
        now = time.monotonic()
        out = []
        for r in self.workers:
            silent = self.silent_s(r, now)
            if silent > STALL_BEATS * self.timeouts.heartbeat_s:
                out.append(f"rank {r} ({self.names[r]}) silent for {silent:.1f}s")
            elif self.loop_stalled.get(r, 0.0) > self.timeouts.dead_rank_s:
                out.append(f"rank {r} ({self.names[r]}) engine loop stalled for "
                           f"{self.loop_stalled[r]:.1f}s")
        return out

    def check(self, now: float) -> None:
        for r in self.workers:
            silent = now - self.last_seen[r]
            if silent > self.timeouts.dead_rank_s:
                self.rank_dead(r, f"no heartbeat for {silent:.1f}s")
                return
            stuck = self.loop_stalled.get(r, 0.0)
            if stuck > self.timeouts.engine_stall_s:
                self.rank_dead(r, f"its engine loop made no progress for {stuck:.1f}s "
                                  f"(its I/O thread still answers)")
                return

    def excuse(self, late_s: float) -> None:
        """The frontend's loop was `late_s` late: nobody could be heard meanwhile."""
        self.num_frontend_stalls += 1
        self.frontend_stalled_s += late_s
        self.max_frontend_stall_s = max(self.max_frontend_stall_s, late_s)
        for r in self.last_seen:
            self.last_seen[r] += late_s

    # ---------------------------------------------------------------- tasks
    async def _monitor(self) -> None:
        interval = min(1.0, self.timeouts.heartbeat_s / 2)
        last = time.monotonic()
        while not self.dead:
            await asyncio.sleep(interval)
            now = time.monotonic()
            late = now - last - interval
            last = now
            if late > interval:
                self.excuse(late)
                await asyncio.sleep(0)          # let queued heartbeats in first
                continue
            self.check(now)

    async def _watch(self, rank: int, mon) -> None:
        from zmq.utils.monitor import parse_monitor_message
        try:
            while True:
                event = parse_monitor_message(await mon.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED and not self.closing:
                    self.rank_dead(rank, "its connection closed (the process is gone)")
                    return
        finally:
            mon.close(linger=0)

    def report(self, stats: dict[int, dict], extra: list[int]) -> dict:
        """/debug/ranks: each rank's last stats, role, silence."""
        now = time.monotonic()
        return {str(r): dict(stats.get(r, {}), role=self.roles[r],
                             silent_s=round(self.silent_s(r, now), 3))
                for r in sorted(self.workers + extra)}

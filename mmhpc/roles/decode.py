"""Decode role. A request's life here:

1. KVReady (prefill): reserve blocks for the prompt's KV (`add_prefilled_request`; no room
   now → it waits in arrival order, within its deadline and prefill's lease).
2. NIXL READ (decode pulls) of every layer's k and v for those blocks from prefill's pool
   (`distributed.kv_layout.plan_tp_reads`), polled each loop turn with a deadline
   (timeouts.kv_transfer_s).
3. Done → ReleaseKV to prefill, `activate_request`; continuous batching from the next step;
   each step's new tokens go to the frontend as TokenStream. With TP, ReleaseKV waits until
   every TP rank's READ is over (`sync_followers`): the leader's READ finishing says nothing
   of a follower's, and prefill reuses freed blocks at once.
AbortRequest, an expired deadline or a failed READ frees the reserved blocks (and tells
prefill with ReleaseKV so its blocks go too). An abort can overtake the KVReady (the frontend
and prefill send them): it is remembered (the last MAX_ABORTED ids), and the late KVReady is
answered with ReleaseKV alone. A READ still in flight then (an abort
mid-transfer, a timeout) keeps its blocks held until it is over (or another
timeouts.kv_transfer_s passed): releasing a NIXL request does not promise that the bytes stop
landing, and the blocks would already belong to someone else.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from mmhpc.engine.interface import make_engine
from mmhpc.engine.sequence import MMItem
from mmhpc.messages.common import AbortRequest, Shutdown
from mmhpc.messages.to_decode import KVReady
from mmhpc.messages.to_frontend import RequestFailed
from mmhpc.messages.to_prefill import ReleaseKV
from mmhpc.engine.tp_worker import start_kv_pull, sync_followers
from mmhpc.roles.worker import Worker, run_worker

log = logging.getLogger(__name__)
MAX_ABORTED = 4096


@dataclass
class _Pull:
    msg: KVReady
    handle: list                   # one NIXL READ per prefill TP rank
    deadline: float
    num_blocks: int = 0
    started: float = 0.0           # perf_counter() at the READ's start


@dataclass
class _Drain:
    """A dropped pull's READs that may still land: its blocks stay held until they are done."""
    request_id: str
    handles: list
    blocks: list[int]
    deadline: float


class DecodeWorker(Worker):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.engine = make_engine(ctx.config, "decode", device=ctx.device, detokenize=False)
        self.pool_descs = ctx.nixl.register(self.engine.kv_cache)
        self.waiting: deque[KVReady] = deque()        # no free blocks yet
        self.pulls: dict[str, _Pull] = {}
        self.active: dict[str, KVReady] = {}           # decoding in the engine
        self.draining: list[_Drain] = []                # dropped pulls, READs maybe in flight
        self.aborted: dict[str, None] = {}             # recent aborts (KVReady may follow)
        self.counts.update(dict.fromkeys(("num_kv_bytes", "num_kv_blocks", "num_kv_pulls",
                                          "kv_pull_s", "num_aborted"), 0))

    def handle(self, src: int, msg) -> None:
        if isinstance(msg, KVReady):
            if msg.request_id in self.aborted:
                self.send(msg.prefill_rank, ReleaseKV(msg.request_id, self.rank))
            else:
                self.waiting.append(msg)
        elif isinstance(msg, AbortRequest):
            self.counts["num_aborted"] += self._drop(msg.request_id) is not None
            self.aborted[msg.request_id] = None
            if len(self.aborted) > MAX_ABORTED:
                self.aborted.pop(next(iter(self.aborted)))
        elif not isinstance(msg, Shutdown):
            log.warning("decode rank %d: unexpected %s", self.rank, type(msg).__name__)

    def busy(self) -> bool:
        return bool(self.active) and self.engine.has_unfinished_requests()

    def transfers_in_flight(self) -> bool:
        return bool(self.pulls or self.draining)

    def tick(self) -> None:
        self._reserve()
        self._poll_pulls()
        self._poll_drains()
        self._expire()
        if self.engine.has_unfinished_requests() and self.active:
            self.stream_step(self.engine, self.active, "decode", "decode engine error")
        self.stats = dict(self.engine.stats(), num_waiting_kv=len(self.waiting),
                          num_pulling=len(self.pulls), num_draining=len(self.draining),
                          num_active=len(self.active),
                          kv_block_bytes=self.engine.kv_block_bytes,
                          **self.counts)

    # ------------------------------------------------------------------------ KV pull
    def _reserve(self) -> None:
        while self.waiting:
            msg = self.waiting[0]
            rid = msg.request_id
            items = [MMItem(m.content_hash, m.offset, m.num_tokens,
                            tuple(m.grid_thw) if m.grid_thw else None) for m in msg.mm_items]
            try:
                blocks = self.engine.add_prefilled_request(rid, msg.prompt_token_ids, msg.params,
                                                           msg.first_token_id, items)
            except Exception as e:  # noqa: BLE001
                self.waiting.popleft()
                self._fail(msg, f"{type(e).__name__}: {e}")
                continue
            if blocks is None:
                return                                 # no room: keep arrival order
            self.waiting.popleft()
            try:
                n = min(len(blocks), len(msg.block_ids))
                deadline = min(msg.deadline, msg.lease_expires,
                               time.time() + self.timeouts.kv_transfer_s)
                # every TP rank of ours READs its KV heads from the prefill TP ranks holding them
                handle = start_kv_pull(self.ctx, self.engine, self.pool_descs, rid, msg.pools,
                                       msg.block_ids[:n], blocks[:n], deadline)
            except Exception as e:  # noqa: BLE001
                self._fail(msg, f"KV READ from rank {msg.prefill_rank} failed: {e}")
                continue
            self.pulls[rid] = _Pull(msg, handle, deadline, n, time.perf_counter())

    def _poll_pulls(self) -> None:
        now = time.time()
        done_pulls: list[_Pull] = []
        for rid, p in list(self.pulls.items()):
            try:
                p.handle[:] = [h for h in p.handle if not self.ctx.nixl.done(h)]
                done = not p.handle
            except Exception as e:  # noqa: BLE001
                del self.pulls[rid]
                self._fail(p.msg, f"KV READ from rank {p.msg.prefill_rank} failed: {e}")
                continue
            if done:
                del self.pulls[rid]
                done_pulls.append(p)
            elif now > p.deadline:
                del self.pulls[rid]
                self._drain(p)
                self._fail(p.msg, f"KV READ from rank {p.msg.prefill_rank} timed out",
                           timeout=True)
        # one barrier for all of this turn's pulls (a follower failing fails them all)
        if done_pulls and not sync_followers([p.msg.request_id for p in done_pulls]):
            for p in done_pulls:
                self._fail(p.msg, "KV READ on a TP follower rank failed (its log says why)")
            return
        for p in done_pulls:
            rid = p.msg.request_id
            self.counts["num_kv_pulls"] += 1
            self.counts["num_kv_blocks"] += p.num_blocks
            self.counts["num_kv_bytes"] += p.num_blocks * self.engine.kv_block_bytes
            self.counts["kv_pull_s"] += time.perf_counter() - p.started
            self.send(p.msg.prefill_rank, ReleaseKV(rid, self.rank))
            self.engine.activate_request(rid)
            self.active[rid] = p.msg

    def _expire(self) -> None:
        now = time.time()
        for msg in [m for m in self.waiting if now > min(m.deadline, m.lease_expires)]:
            self.waiting.remove(msg)
            self._fail(msg, "no free KV blocks on decode before the deadline", timeout=True)
        for rid, msg in list(self.active.items()):
            if now > msg.deadline:
                self._fail(msg, "decode deadline passed", timeout=True)

    # ------------------------------------------------------------------------ cleanup
    def _drop(self, rid: str) -> KVReady | None:
        """Free the request's blocks here; returns its KVReady if it was ours."""
        msg = self.active.pop(rid, None)
        pull = self.pulls.pop(rid, None)
        if pull is not None:
            self._drain(pull)
            msg = pull.msg
        for m in [m for m in self.waiting if m.request_id == rid]:
            self.waiting.remove(m)
            msg = m
        self.engine.abort_request(rid)
        return msg

    def _finished(self, h) -> bool:
        try:
            return self.ctx.nixl.done(h)
        except Exception:  # noqa: BLE001 - failed: nothing more lands
            return True

    def _drain(self, pull: _Pull) -> None:
        """Before the engine drops a pull's request: hold its blocks while a READ may land."""
        live = [h for h in pull.handle if not self._finished(h)]
        pull.handle[:] = []
        if live:
            rid = pull.msg.request_id
            self.draining.append(_Drain(rid, live, self.engine.hold_blocks(rid),
                                        time.time() + self.timeouts.kv_transfer_s))

    def _poll_drains(self) -> None:
        now = time.time()
        for d in list(self.draining):
            d.handles = [h for h in d.handles if not self._finished(h)]
            if d.handles and now <= d.deadline:
                continue
            for h in d.handles:
                self.ctx.nixl.release(h)
            if d.handles:
                log.warning("decode rank %d: a KV READ of dropped request %s still in flight "
                            "after another %.0f s; its %d blocks go back to the pool", self.rank,
                            d.request_id, self.timeouts.kv_transfer_s, len(d.blocks))
            self.engine.unhold_blocks(d.blocks)
            self.draining.remove(d)

    def _fail(self, msg: KVReady, message: str, timeout: bool = False) -> None:
        rid = msg.request_id
        pulled = rid in self.active
        self._drop(rid)
        if not pulled:                      # prefill still holds the blocks
            self.send(msg.prefill_rank, ReleaseKV(rid, self.rank))
        self.send(msg.frontend_rank, RequestFailed(rid, self.rank, "decode", message, timeout))


def setup(ctx) -> None:
    ctx.worker = DecodeWorker(ctx)


def run(ctx) -> None:
    run_worker(ctx)

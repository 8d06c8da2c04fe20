"""Prefill role. A request's life here:

1. PrefillRequest (frontend). ep_d: its images ride in the message; the engine encodes them
   in its step. e_p_d: EmbeddingsReady messages (encode, any order w.r.t. the request) → NIXL
   READ of the rows into a local registered landing pool → tensors → ReleaseEmbeddings.
2. All embeddings in → `engine.add_request(prefill_only=True)` (M-RoPE positions come from the
   token ids + grids) → the step samples the first token → TokenStream to the frontend.
3. Not finished by its first token: the engine retains its KV blocks; KVReady (block ids + our
   pool's descriptors) to the decode rank, which READs and answers ReleaseKV → blocks freed,
   or the lease (timeouts.kv_lease_s) expires → freed.
Every request has a stage deadline (request deadline, timeouts.prefill_s); AbortRequest or an
expired deadline frees whatever it holds (pending reads, landing rows, engine blocks).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from mmhpc.engine.interface import make_engine
from mmhpc.engine.sequence import MMItem
from mmhpc.messages.common import AbortRequest, Shutdown
from mmhpc.messages.to_decode import KVReady
from mmhpc.messages.to_encode import ReleaseEmbeddings
from mmhpc.messages.to_frontend import RequestFailed, TokenStream
from mmhpc.messages.to_prefill import EmbeddingsReady, PrefillRequest, ReleaseKV
from mmhpc.multimodal.image_items import media_item
from mmhpc.roles.embed_pool import EmbeddingPool, embedding_pool_rows, row_width
from mmhpc.roles.worker import Worker, frontend_hashes, run_worker, stage_deadline

log = logging.getLogger(__name__)
MAX_ABORTED = 4096


@dataclass
class _Read:
    request_id: str
    msg: EmbeddingsReady
    handle: object
    start: int
    deadline: float
    timed_out: bool = False          # failed already; its landing rows wait for the READ
    started: float = 0.0             # perf_counter() at the READ's start


class PrefillWorker(Worker):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.engine = make_engine(ctx.config, "prefill", device=ctx.device, detokenize=False)
        self.processor = self.engine.processor
        self.hidden_size = self.engine.hidden_size
        self.deepstack = self.engine.deepstack_levels
        self.pool_descs = ctx.nixl.register(self.engine.kv_cache)
        ctx.kv_pool_descs = self.pool_descs     # TP: every rank's pool rides KVReady.pools
        self.landing = None
        if "encode" in ctx.config.deployment.groups:
            self.landing = EmbeddingPool(row_width(self.engine), self.engine.dtype,
                                         embedding_pool_rows(ctx.config), device=ctx.device)
            ctx.nixl.register(self.landing.tensor)
        self.requests: dict[str, PrefillRequest] = {}    # waiting for embeddings or in engine
        self.deadlines: dict[str, float] = {}            # stage deadline per request
        self.in_engine: set[str] = set()
        self.embeds: dict[str, dict[str, torch.Tensor]] = {}
        self.embeds_seen: dict[str, float] = {}          # first EmbeddingsReady time
        self.reads: list[_Read] = []
        self.unlanded: list[EmbeddingsReady] = []        # no landing rows yet, in order
        self.leases: dict[str, float] = {}               # retained KV: request_id -> expiry
        self.aborted: dict[str, None] = {}
        self.num_lease_expired = 0
        self.arrived: dict[str, float] = {}             # request id -> arrival (queue time)
        self.counts.update(dict.fromkeys((
            "num_prefills", "num_prefill_tokens", "num_cached_tokens", "num_handed_blocks",
            "prefill_s", "queue_s", "num_embedding_reads", "num_embedding_bytes",
            "embedding_read_s", "num_aborted"), 0))

    # ------------------------------------------------------------------------ messages
    def handle(self, src: int, msg) -> None:
        if isinstance(msg, PrefillRequest):
            self._on_request(msg)
        elif isinstance(msg, EmbeddingsReady):
            self._on_embeddings(msg)
        elif isinstance(msg, ReleaseKV):
            self.leases.pop(msg.request_id, None)
            self.engine.release_request(msg.request_id)
        elif isinstance(msg, AbortRequest):
            self.counts["num_aborted"] += msg.request_id in self.requests \
                or msg.request_id in self.leases
            self._drop(msg.request_id)
        elif not isinstance(msg, Shutdown):
            log.warning("prefill rank %d: unexpected %s", self.rank, type(msg).__name__)

    def _on_request(self, req: PrefillRequest) -> None:
        rid = req.request_id
        if rid in self.aborted:
            return
        stage_s = self.timeouts.prefill_s + (self.timeouts.encode_s if req.encode_rank >= 0 else 0)
        self.requests[rid] = req
        self.arrived[rid] = time.time()
        self.deadlines[rid] = stage_deadline(req.deadline, stage_s)
        if req.encode_rank < 0:
            try:
                items = [media_item(self.processor, img, self.ctx.config, self.hidden_size,
                                    self.deepstack)
                         for img in req.images]
            except Exception as e:  # noqa: BLE001
                self._fail(rid, f"cannot prepare image: {type(e).__name__}: {e}")
                return
            self._add(req, items)

    def _on_embeddings(self, msg: EmbeddingsReady) -> None:
        rid = msg.request_id
        release = ReleaseEmbeddings(rid, [msg.content_hash])
        if rid in self.aborted or self.landing is None:
            self.send(msg.encode_rank, release)
            return
        if msg.hidden_size != self.landing.tensor.shape[1]:
            self.send(msg.encode_rank, release)
            self._fail(rid, f"encode sent {msg.hidden_size}-wide embedding rows; this model's "
                            f"are {self.landing.tensor.shape[1]} wide")
            return
        start = self.landing.alloc(msg.num_tokens)
        if start is None:                   # READs in flight hold the rows: wait for them
            self.unlanded.append(msg)
            return
        view = self.landing.rows(start, msg.num_tokens)
        try:
            handle = self.ctx.nixl.read(self.ctx.nixl.descs(view), msg.descs)
        except Exception as e:  # noqa: BLE001
            self.landing.free(start, msg.num_tokens)
            self.send(msg.encode_rank, release)
            self._fail(rid, f"embedding READ failed: {e}")
            return
        self.embeds_seen.setdefault(rid, time.time())
        deadline = stage_deadline(self.deadlines.get(rid, time.time() + self.timeouts.encode_s),
                                  self.timeouts.kv_transfer_s)
        self.reads.append(_Read(rid, msg, handle, start, deadline, started=time.perf_counter()))

    # ------------------------------------------------------------------------ loop
    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def transfers_in_flight(self) -> bool:
        return bool(self.reads or self.unlanded)

    def tick(self) -> None:
        self._poll_reads()
        if self.unlanded:
            waiting, self.unlanded = self.unlanded, []
            for msg in waiting:
                self._on_embeddings(msg)
        self._admit_ready()
        self._expire()
        if self.engine.has_unfinished_requests():
            self._step()
        self.stats = dict(self.engine.stats(), num_pending=len(self.requests) - len(self.in_engine),
                          num_retained=len(self.leases), num_lease_expired=self.num_lease_expired,
                          **self.counts,
                          num_unlanded=len(self.unlanded),
                          num_free_rows=self.landing.num_free_rows if self.landing else 0,
                          num_total_rows=self.landing.num_rows if self.landing else 0)

    def _poll_reads(self) -> None:
        """Finished READs hand their rows over; a READ past its deadline fails its request at
        once, but its landing rows stay taken until it is over (or another kv_transfer_s
        passed): released or not, a NIXL READ may still write them."""
        now, keep = time.time(), []
        for r in self.reads:
            try:
                done, failed = self.ctx.nixl.done(r.handle), None
            except Exception as e:  # noqa: BLE001 - failed: nothing more lands
                done, failed = False, f"embedding READ failed: {e}"
            n = r.msg.num_tokens
            if r.timed_out:
                if done or failed:
                    self.landing.free(r.start, n)
                elif now > r.deadline:          # the grace is over too
                    self.ctx.nixl.release(r.handle)
                    self.landing.free(r.start, n)
                    log.warning("prefill rank %d: an embedding READ of %s still in flight after "
                                "another %.0f s; its landing rows go back", self.rank,
                                r.request_id, self.timeouts.kv_transfer_s)
                else:
                    keep.append(r)
                continue
            err = failed or (None if done or now < r.deadline else "embedding READ timed out")
            if not done and err is None:
                keep.append(r)
                continue
            if done:
                self.counts["num_embedding_reads"] += 1
                self.counts["num_embedding_bytes"] += n * self.landing.row_bytes
                self.counts["embedding_read_s"] += time.perf_counter() - r.started
            if done and r.request_id not in self.aborted:
                self.embeds.setdefault(r.request_id, {})[r.msg.content_hash] = \
                    self.landing.rows(r.start, n).clone()
            self.send(r.msg.encode_rank, ReleaseEmbeddings(r.request_id, [r.msg.content_hash]))
            if err:
                self._fail(r.request_id, err, timeout=not failed)
            if err and not failed:              # timed out: may still land
                r.timed_out, r.deadline = True, now + self.timeouts.kv_transfer_s
                keep.append(r)
            else:
                self.landing.free(r.start, n)
        self.reads = keep

    def _admit_ready(self) -> None:
        for rid, req in list(self.requests.items()):
            if rid in self.in_engine or req.encode_rank < 0:
                continue
            got = self.embeds.get(rid, {})
            if all(m.content_hash in got for m in req.mm_items):
                items = [MMItem(m.content_hash, m.offset, m.num_tokens,
                                tuple(m.grid_thw) if m.grid_thw else None,
                                embeddings=got[m.content_hash]) for m in req.mm_items]
                self.embeds.pop(rid, None)
                self.embeds_seen.pop(rid, None)
                self._add(req, items)

    def _add(self, req: PrefillRequest, items: list[MMItem]) -> None:
        self.counts["queue_s"] += time.time() - self.arrived.pop(req.request_id, time.time())
        try:
            self.engine.add_request(req.request_id, req.prompt_token_ids, req.params, items,
                                    prefill_only=True,
                                    block_hashes=frontend_hashes(req, self.engine))
            self.in_engine.add(req.request_id)
        except Exception as e:  # noqa: BLE001
            self._fail(req.request_id, f"{type(e).__name__}: {e}")

    def _expire(self) -> None:
        now = time.time()
        for rid, d in list(self.deadlines.items()):
            if now > d:
                self._fail(rid, "prefill deadline passed", timeout=True)
        for rid, t in list(self.embeds_seen.items()):   # embeddings whose request never came
            if rid not in self.requests and now - t > self.timeouts.prefill_s:
                self._drop(rid)
        for rid, t in list(self.leases.items()):
            if now > t:
                del self.leases[rid]
                self.num_lease_expired += 1
                self.engine.release_request(rid)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail what was in the engine, keep the rank
            log.exception("prefill rank %d: step failed", self.rank)
            for rid in list(self.in_engine):
                self._fail(rid, f"prefill engine error: {type(e).__name__}: {e}")
            return
        finally:
            self.counts["prefill_s"] += time.perf_counter() - t0
        for out in outputs:
            req = self.requests.get(out.request_id)
            if req is None:
                continue
            self.counts["num_prefills"] += 1
            self.counts["num_prefill_tokens"] += out.num_prompt_tokens
            self.counts["num_cached_tokens"] += out.num_cached_tokens
            self.send(req.frontend_rank, TokenStream.of(out, "prefill"))
            self._forget(out.request_id)
            if not out.finished:
                self._hand_off(req, out.new_token_ids[0])

    def _hand_off(self, req: PrefillRequest, first_token: int) -> None:
        rid = req.request_id
        blocks = self.engine.retained_block_ids(rid)
        if blocks is None:
            self._fail(rid, "prefill lost the request's KV blocks")
            return
        lease = time.time() + self.timeouts.kv_lease_s
        self.leases[rid] = lease
        self.counts["num_handed_blocks"] += len(blocks)
        self.send(req.decode_rank, KVReady(
            rid, req.prompt_token_ids, first_token, req.params, blocks,
            len(req.prompt_token_ids), [p.agent for p in self.tp_pools], self.tp_pools, self.rank,
            req.deadline, lease, req.mm_items, frontend_rank=req.frontend_rank))

    # ------------------------------------------------------------------------ cleanup
    @property
    def tp_pools(self) -> list:
        """KV pools of this instance's TP ranks (rank order), set by the launcher."""
        return getattr(self.ctx, "tp_pools", None) or [self.pool_descs]

    def _forget(self, rid: str) -> None:
        self.arrived.pop(rid, None)
        self.requests.pop(rid, None)
        self.deadlines.pop(rid, None)
        self.in_engine.discard(rid)

    def _drop(self, rid: str) -> None:
        """Free everything held for `rid` (abort, failure): engine blocks, embeddings."""
        self.aborted[rid] = None
        if len(self.aborted) > MAX_ABORTED:
            self.aborted.pop(next(iter(self.aborted)))
        self.engine.abort_request(rid)           # waiting, running or retained
        self.leases.pop(rid, None)
        self._forget(rid)
        self.embeds.pop(rid, None)
        self.embeds_seen.pop(rid, None)

    def _fail(self, rid: str, message: str, timeout: bool = False) -> None:
        req = self.requests.get(rid)
        self._drop(rid)
        self.send(req.frontend_rank if req else self.ctx.layout.frontend_rank,
                  RequestFailed(rid, self.rank, "prefill", message, timeout))


def setup(ctx) -> None:
    ctx.worker = PrefillWorker(ctx)


def run(ctx) -> None:
    run_worker(ctx)

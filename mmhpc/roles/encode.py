"""Encode role: image bytes → processor → vision encoder + projector (batched across the
requests of one loop turn) → rows of a NIXL-registered EmbeddingPool → EmbeddingsReady to the
request's prefill rank, which READs the rows and answers ReleaseEmbeddings. Pre-computed
embeddings files enter here too: loaded (`image_items.load_embedding_item`, the frontend's safe
loader and checks) straight into the pool, no vision encoder; EP/D prefill and the aggregated
role load them the same way (`image_items.media_item`).

Entries are cached by content hash (same hash → no re-encode) and pinned per request until
ReleaseEmbeddings, an AbortRequest, or the lease (timeouts.kv_lease_s); unpinned entries are
evicted least-recently-used when the pool is full. A pool full of pinned entries makes the
request wait (its embeddings kept aside) until others are released; past the stage deadline
(timeouts.encode_s) it alone fails with 429; an image larger than the whole pool fails with
413 (the frontend refuses those before they come). Never an exception out of the loop.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from mmhpc.engine.interface import make_engine
from mmhpc.engine.sequence import MMItem
from mmhpc.messages.common import AbortRequest, Shutdown
from mmhpc.messages.to_encode import EncodeRequest, ImageItem, ReleaseEmbeddings
from mmhpc.messages.to_frontend import RequestFailed
from mmhpc.messages.to_prefill import EmbeddingsReady
from mmhpc.multimodal.image_items import EMBEDDING_FORMATS, decode_image, load_embedding_item
from mmhpc.roles.embed_pool import EmbeddingPool, embedding_pool_rows, row_width
from mmhpc.roles.worker import Worker, run_worker

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    start: int
    num_rows: int
    grid_thw: list[int] | None
    pins: dict[str, float] = field(default_factory=dict)    # request_id -> lease expiry


class EncodeWorker(Worker):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.engine = make_engine(ctx.config, "encode", device=ctx.device)
        self.processor = self.engine.processor
        self.hidden_size = self.engine.hidden_size
        self.deepstack = self.engine.deepstack_levels
        self.row_width = row_width(self.engine)         # embeddings + DeepStack blocks
        self.pool = EmbeddingPool(self.row_width, self.engine.dtype,
                                  embedding_pool_rows(ctx.config), device=ctx.device)
        self.pool_descs = ctx.nixl.register(self.pool.tensor)
        self.dtype = str(self.engine.dtype).removeprefix("torch.")
        self.cache: OrderedDict[str, _Entry] = OrderedDict()
        self.pending: list[EncodeRequest] = []
        self.arrived: dict[str, float] = {}                 # request id -> arrival
        self.blocked: deque[EncodeRequest] = deque()        # waiting for pool rows, in order
        self.unstored: dict[str, MMItem] = {}               # encoded, not in the pool yet
        self.counts.update(dict.fromkeys((         # num_loaded: pre-computed embeddings files
            "num_encoded", "num_loaded", "num_cache_hits", "num_cache_queries", "num_batches",
            "encode_s", "queue_s", "num_pool_waits", "num_aborted", "num_published_rows"), 0))

    def handle(self, src: int, msg) -> None:
        if isinstance(msg, EncodeRequest):
            self.pending.append(msg)
            self.arrived[msg.request_id] = time.time()
        elif isinstance(msg, ReleaseEmbeddings):
            self._unpin(msg.request_id, msg.content_hashes or None)
        elif isinstance(msg, AbortRequest):
            rid = msg.request_id
            n = len(self.pending) + len(self.blocked)
            self.pending = [r for r in self.pending if r.request_id != rid]
            self.blocked = deque(r for r in self.blocked if r.request_id != rid)
            self.counts["num_aborted"] += n > len(self.pending) + len(self.blocked)
            self.arrived.pop(rid, None)
            self._unpin(rid, None)
        elif not isinstance(msg, Shutdown):
            log.warning("encode rank %d: unexpected %s", self.rank, type(msg).__name__)

    def busy(self) -> bool:
        return bool(self.pending)

    def tick(self) -> None:
        self._expire_pins()
        self._retry_blocked()
        if self.pending:
            batch, self.pending = self.pending, []
            self._encode(batch)
        self.stats = dict(num_waiting=len(self.pending) + len(self.blocked),
                          num_cached_items=len(self.cache), num_free_rows=self.pool.num_free_rows,
                          num_total_rows=self.pool.num_rows, **self.counts,
                          num_pinned_items=sum(bool(e.pins) for e in self.cache.values()),
                          row_bytes=self.pool.row_bytes)

    # ------------------------------------------------------------------------------------
    def _encode(self, batch: list[EncodeRequest]) -> None:
        now = time.time()
        live, todo = [], {}                 # todo: content_hash -> MMItem (one encode per hash)
        for req in batch:
            self.counts["queue_s"] += now - self.arrived.get(req.request_id, now)
            if now > req.deadline:
                self._fail(req, "encode deadline passed before the images were encoded", True)
                continue
            try:
                rows = sum({it.content_hash: it.num_tokens for it in req.items}.values())
                if rows > self.pool.num_rows:
                    raise _Refused(413, f"the request's images need {rows} embedding rows; the "
                                        f"pool has {self.pool.num_rows} (cache.embedding_pool_"
                                        f"rows)")
                for it in req.items:
                    self.counts["num_cache_queries"] += 1
                    if it.content_hash in self.cache or it.content_hash in self.unstored:
                        self.counts["num_cache_hits"] += 1
                    elif it.content_hash not in todo:
                        todo[it.content_hash] = self._mm_item(it)
                live.append(req)
            except _Refused as e:
                self._fail(req, str(e), status=e.status)
            except Exception as e:  # noqa: BLE001 - a bad image fails its request only
                self._fail(req, f"cannot prepare image: {type(e).__name__}: {e}")
        images = [m for m in todo.values() if m.embeddings is None]  # files come loaded
        if images:
            t0 = time.perf_counter()
            try:
                self.engine.encode(images)                  # one vision batch
            except Exception as e:  # noqa: BLE001
                log.exception("encode rank %d: vision encoder failed", self.rank)
                for req in live:
                    self._fail(req, f"vision encoder failed: {type(e).__name__}: {e}")
                return
            self.counts["encode_s"] += time.perf_counter() - t0
            self.counts["num_batches"] += 1
            self.counts["num_encoded"] += len(images)
        self.counts["num_loaded"] += len(todo) - len(images)
        self.unstored.update(todo)
        for req in live:
            placed = False if self.blocked else self._place(req)
            if placed:
                self._publish(req)
            elif placed is None:
                self.pending.append(req)
            else:
                self._wait(req)

    def _place(self, req: EncodeRequest) -> bool | None:
        """Every item of `req` in the pool (evicting unpinned entries), pinned for it? False:
        no room yet (what is in stays pinned: the head of the queue gathers rows); None: an
        item is gone (a cache hit evicted meanwhile): encode the request again."""
        lease = time.time() + self.timeouts.kv_lease_s
        for it in req.items:
            h = it.content_hash
            if h not in self.cache:
                item = self.unstored.get(h)
                if item is None:
                    return None
                if not self._store(h, item):
                    return False
            self.unstored.pop(h, None)
            self.cache[h].pins.setdefault(req.request_id, lease)
        return True

    def _wait(self, req: EncodeRequest) -> None:
        """The pool is full of pinned entries: wait, in arrival order, for rows."""
        self.counts["num_pool_waits"] += 1
        self.blocked.append(req)

    def _retry_blocked(self) -> None:
        now = time.time()
        while self.blocked:
            req = self.blocked[0]
            placed = self._place(req)
            if placed or placed is None:
                self.blocked.popleft()
                if placed:
                    self._publish(req)
                else:
                    self.pending.append(req)
                continue
            waited = now - self.arrived.get(req.request_id, now)
            if now > req.deadline or waited > self.timeouts.encode_s:
                self.blocked.popleft()
                self._fail(req, f"embedding pool full: its {self.pool.num_rows} rows are held "
                                f"by other requests; retry later", status=429)
                continue
            return
        if not self.pending:
            needed = {it.content_hash for r in self.blocked for it in r.items}
            for h in [h for h in self.unstored if h not in needed]:
                del self.unstored[h]

    def _mm_item(self, it: ImageItem) -> MMItem:
        if it.format in EMBEDDING_FORMATS:
            return load_embedding_item(self.processor, it, self.ctx.config.media,
                                       self.hidden_size, self.ctx.config.model.max_model_len,
                                       self.deepstack)
        item = self.processor.image_item(decode_image(it))
        if item.num_tokens != it.num_tokens:
            raise ValueError(f"image has {item.num_tokens} tokens here, the frontend counted "
                             f"{it.num_tokens}")
        return item

    def _store(self, content_hash: str, item: MMItem) -> bool:
        emb = item.embeddings                                     # [n, row_width]
        start = self.pool.alloc(emb.shape[0])
        while start is None and self._evict_one():
            start = self.pool.alloc(emb.shape[0])
        if start is None:
            return False                                          # full of pinned entries
        self.pool.rows(start, emb.shape[0]).copy_(emb)
        self.cache[content_hash] = _Entry(start, emb.shape[0],
                                          list(item.grid_thw) if item.grid_thw else None)
        return True

    def _evict_one(self) -> bool:
        for h, e in self.cache.items():           # oldest first
            if not e.pins:
                del self.cache[h]
                self.pool.free(e.start, e.num_rows)
                return True
        return False

    def _publish(self, req: EncodeRequest) -> None:
        lease = time.time() + self.timeouts.kv_lease_s
        self.arrived.pop(req.request_id, None)
        for it in req.items:
            e = self.cache[it.content_hash]
            self.cache.move_to_end(it.content_hash)
            e.pins[req.request_id] = lease
            view = self.pool.rows(e.start, e.num_rows)
            self.counts["num_published_rows"] += e.num_rows
            self.send(req.prefill_rank, EmbeddingsReady(
                req.request_id, it.content_hash, self.ctx.nixl.descs(view), e.num_rows,
                self.row_width, self.dtype, self.rank, e.grid_thw,
                getattr(self.processor, "merge_size", 1)))

    def _unpin(self, request_id: str, hashes: list[str] | None) -> None:
        for h, e in self.cache.items():
            if hashes is None or h in hashes:
                e.pins.pop(request_id, None)

    def _expire_pins(self) -> None:
        now = time.time()
        for e in self.cache.values():
            for rid in [r for r, t in e.pins.items() if t < now]:
                del e.pins[rid]

    def _fail(self, req: EncodeRequest, message: str, timeout: bool = False,
              status: int = 0) -> None:
        self._unpin(req.request_id, None)
        self.arrived.pop(req.request_id, None)
        self.send(req.frontend_rank, RequestFailed(req.request_id, self.rank, "encode",
                                                   message, timeout, status))


class _Refused(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def setup(ctx) -> None:
    ctx.worker = EncodeWorker(ctx)


def run(ctx) -> None:
    run_worker(ctx)

"""Encode role: image bytes → processor → vision encoder + projector (batched across the
requests of one loop turn) → rows of a NIXL-registered EmbeddingPool → EmbeddingsReady to the
request's prefill rank, which READs the rows and answers ReleaseEmbeddings. Pre-computed
embeddings files enter here too: loaded (`load_embedding_item`, the frontend's safe loader and
checks) straight into the pool, no vision encoder; EP/D prefill and the aggregated role load
them the same way (`media_item`).

Entries are cached by content hash (same hash → no re-encode) and pinned per request until
ReleaseEmbeddings, an AbortRequest, or the lease (timeouts.kv_lease_s); unpinned entries are
evicted least-recently-used when the pool is full.
"""
from __future__ import annotations

import io
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from mmhpc.engine.sequence import MMItem
from mmhpc.messages.common import AbortRequest, Shutdown
from mmhpc.messages.to_encode import EncodeRequest, ImageItem, ReleaseEmbeddings
from mmhpc.messages.to_frontend import RequestFailed
from mmhpc.messages.to_prefill import EmbeddingsReady
from mmhpc.roles.embed_pool import EmbeddingPool, row_width
from mmhpc.roles.worker import Worker, run_worker

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    start: int
    num_rows: int
    grid_thw: list[int] | None
    pins: dict[str, float] = field(default_factory=dict)    # request_id -> lease expiry


EMBEDDING_FORMATS = ("embedding_file", "embedding_bytes")


def decode_image(item: ImageItem):
    from PIL import Image
    if item.format == "rgb":
        return Image.frombytes("RGB", (item.width, item.height), item.data)
    if item.format == "encoded":
        return Image.open(io.BytesIO(item.data)).convert("RGB")
    raise ValueError(f"image format {item.format!r} is not supported by the encode role")


def load_embedding_item(processor, item: ImageItem, media_cfg, hidden_size: int,
                        max_tokens: int, deepstack: int = 0) -> MMItem:
    """A pre-computed embeddings file → MMItem with `embeddings` [n, hidden] float32 (a
    DeepStack model's: [n, (1 + deepstack) * hidden], media.load_embeddings), by the
    frontend's own rules: a local file re-checked against media.allowed_local_path and the
    size cap, loaded without pickle code, shape / dtype / hidden size checked, its grid (or the
    default) taken as the frontend did. The content hash must be the frontend's: a file that
    changed since the frontend read it fails its request (the caches key on that hash)."""
    from mmhpc.server.media import load_embeddings, read_local_file
    cap = int(media_cfg.max_file_size_mb * (1 << 20))
    if item.format == "embedding_file":
        _, data = read_local_file(media_cfg.allowed_local_path, item.path, cap)
    elif len(item.data) > cap:
        raise ValueError(f"embeddings file is {len(item.data)} bytes; the limit is {cap}")
    else:
        data = item.data
    emb = load_embeddings(data, item.path, hidden_size, max_tokens, deepstack=deepstack)
    mm = processor.embedding_item(emb.processor_input())
    if mm.content_hash != item.content_hash:
        raise ValueError(f"embeddings file {item.path!r} changed since the frontend read it")
    if mm.num_tokens != item.num_tokens:
        raise ValueError(f"embeddings file has {mm.num_tokens} rows here, the frontend "
                         f"counted {item.num_tokens}")
    mm.offset = item.offset
    return mm


def media_item(processor, item: ImageItem, config, hidden_size: int,
               deepstack: int = 0) -> MMItem:
    """An ImageItem → MMItem ready for the engine: an image preprocessed (pixel values, grid)
    or an embeddings file loaded (see load_embedding_item). Offset from the item."""
    if item.format in EMBEDDING_FORMATS:
        return load_embedding_item(processor, item, config.media, hidden_size,
                                   config.model.max_model_len, deepstack)
    mm = processor.image_item(decode_image(item))
    mm.offset = item.offset
    return mm


class EncodeWorker(Worker):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        from mmhpc.engine.engine import LLMEngine
        self.engine = LLMEngine(ctx.config, encode_only=True, device=ctx.device)
        self.processor = self.engine.processor
        runner = self.engine.runner
        self.hidden_size = runner.model.text_config.hidden_size
        self.deepstack = getattr(runner.model, "deepstack_levels", 0)
        self.row_width = row_width(runner.model)       # embeddings + DeepStack blocks
        self.pool = EmbeddingPool(self.row_width, runner.dtype, device=ctx.device)
        self.pool_descs = ctx.nixl.register(self.pool.tensor)
        self.dtype = str(runner.dtype).removeprefix("torch.")
        self.cache: OrderedDict[str, _Entry] = OrderedDict()
        self.pending: list[EncodeRequest] = []
        self.num_encoded = 0
        self.num_loaded = 0                 # pre-computed embeddings files
        self.num_cache_hits = 0

    def handle(self, src: int, msg) -> None:
        if isinstance(msg, EncodeRequest):
            self.pending.append(msg)
        elif isinstance(msg, ReleaseEmbeddings):
            self._unpin(msg.request_id, msg.content_hashes or None)
        elif isinstance(msg, AbortRequest):
            self.pending = [r for r in self.pending if r.request_id != msg.request_id]
            self._unpin(msg.request_id, None)
        elif not isinstance(msg, Shutdown):
            log.warning("encode rank %d: unexpected %s", self.rank, type(msg).__name__)

    def busy(self) -> bool:
        return bool(self.pending)

    def tick(self) -> None:
        self._expire_pins()
        if self.pending:
            batch, self.pending = self.pending, []
            self._encode(batch)
        self.stats = dict(num_waiting=len(self.pending), num_cached_items=len(self.cache),
                          num_free_rows=self.pool.num_free_rows, num_encoded=self.num_encoded,
                          num_loaded=self.num_loaded, num_cache_hits=self.num_cache_hits)

    # ------------------------------------------------------------------------------------
    def _encode(self, batch: list[EncodeRequest]) -> None:
        now = time.time()
        live, todo = [], {}                 # todo: content_hash -> MMItem (one encode per hash)
        for req in batch:
            if now > req.deadline:
                self._fail(req, "encode deadline passed before the images were encoded", True)
                continue
            try:
                for it in req.items:
                    if it.content_hash in self.cache:
                        self.num_cache_hits += 1
                    elif it.content_hash not in todo:
                        todo[it.content_hash] = self._mm_item(it)
                live.append(req)
            except Exception as e:  # noqa: BLE001 - a bad image fails its request only
                self._fail(req, f"cannot prepare image: {type(e).__name__}: {e}")
        images = [m for m in todo.values() if m.embeddings is None]  # files come loaded
        if images:
            try:
                self.engine.encode(images)                  # one vision batch
            except Exception as e:  # noqa: BLE001
                log.exception("encode rank %d: vision encoder failed", self.rank)
                for req in live:
                    self._fail(req, f"vision encoder failed: {type(e).__name__}: {e}")
                return
            self.num_encoded += len(images)
        self.num_loaded += len(todo) - len(images)
        for h, item in todo.items():
            self._store(h, item)
        for req in live:
            self._publish(req)

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

    def _store(self, content_hash: str, item: MMItem) -> None:
        emb = item.embeddings                                     # [n, row_width]
        start = self.pool.alloc(emb.shape[0])
        while start is None and self._evict_one():
            start = self.pool.alloc(emb.shape[0])
        if start is None:
            raise RuntimeError("embedding pool full of pinned entries")
        self.pool.rows(start, emb.shape[0]).copy_(emb)
        self.cache[content_hash] = _Entry(start, emb.shape[0],
                                          list(item.grid_thw) if item.grid_thw else None)

    def _evict_one(self) -> bool:
        for h, e in self.cache.items():           # oldest first
            if not e.pins:
                del self.cache[h]
                self.pool.free(e.start, e.num_rows)
                return True
        return False

    def _publish(self, req: EncodeRequest) -> None:
        lease = time.time() + self.timeouts.kv_lease_s
        for it in req.items:
            e = self.cache.get(it.content_hash)
            if e is None:
                self._fail(req, "embedding pool full of pinned entries")
                return
        for it in req.items:
            e = self.cache[it.content_hash]
            self.cache.move_to_end(it.content_hash)
            e.pins[req.request_id] = lease
            view = self.pool.rows(e.start, e.num_rows)
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

    def _fail(self, req: EncodeRequest, message: str, timeout: bool = False) -> None:
        self._unpin(req.request_id, None)
        self.send(req.frontend_rank, RequestFailed(req.request_id, self.rank, "encode",
                                                   message, timeout))


def setup(ctx) -> None:
    ctx.worker = EncodeWorker(ctx)


def run(ctx) -> None:
    run_worker(ctx)

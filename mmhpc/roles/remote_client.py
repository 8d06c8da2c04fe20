"""`RemoteEngineClient`: the frontend's engine, driving the encode / prefill / decode (or
aggregated) ranks over ZeroMQ. Tensors move over NIXL between workers, never through here.

A request's control flow:
    generate → place (mmhpc.roles.placement) → [EncodeRequest → encode] + PrefillRequest →
    prefill ← TokenStream(first token, prefill) ← TokenStream(..., decode)
            ← RequestFailed(any stage; `status` 413 / 429: refused, an APIError)
Leaving early, a deadline or a failure sends AbortRequest to every rank of the request.
Messages carrying images are encoded off the event loop (a 16-image request is hundreds of
MB of pixels), then sent from it. Rank deaths (mmhpc.roles.liveness) fail every in-flight
request, ONE line names the rank and its role, the server stops and the job aborts; a request
arriving after that gets a clean 503.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from mmhpc.engine.block_manager import pack_hashes
from mmhpc.engine.detokenizer import IncrementalDetokenizer
from mmhpc.engine.outputs import RequestOutput
from mmhpc.messages.common import AbortRequest, Heartbeat, MMItemMeta, Shutdown
from mmhpc.messages.to_aggregated import GenerateRequest
from mmhpc.messages.to_encode import EncodeRequest, ImageItem
from mmhpc.messages.to_frontend import RequestFailed, TokenStream
from mmhpc.messages.to_prefill import PrefillRequest
from mmhpc.roles.embed_pool import embedding_pool_rows
from mmhpc.roles.liveness import Liveness
from mmhpc.roles.placement import Placement
from mmhpc.server.engine_client import EngineClient
from mmhpc.server.protocol import APIError

log = logging.getLogger(__name__)
PROMPT_TAIL = 4
REFUSALS = {413: "request_too_large", 429: "rate_limit_exceeded"}


@dataclass
class _Request:
    queue: asyncio.Queue
    ranks: list[int]
    detok: IncrementalDetokenizer
    got_first: bool = False                     # prefill's token came (decode's wait for it)
    held: list = field(default_factory=list)


def unavailable(why: str) -> APIError:
    return APIError(503, why, type="service_unavailable", code="unavailable")


class RemoteEngineClient(EngineClient):
    """`local`: the worker sharing rank 0 (frontend_shares_rank=true), whose loop runs in a
    thread here: messages for rank 0 that are not the frontend's go to its inbox, its sends
    come back through `route_from_local` on the event loop."""

    def __init__(self, ctx, processor, local=None) -> None:
        self.ctx = ctx
        self.rank = ctx.rank
        self.local = local
        self.config = ctx.config
        self.mailbox = ctx.mailbox
        self.tokenizer = processor.tokenizer
        layout = ctx.layout
        self.roles = {r.rank: r.role for r in layout.ranks}
        self.workers = [r.rank for r in layout.ranks
                        if r.role != "frontend" and r.rank != self.rank]
        self.placement = Placement(self.config, layout, self._refresh_local)
        self.placement.rank_stats = {r: {} for r in self.workers}
        if local is not None:
            self.placement.rank_stats[self.rank] = {}
        names = {p.rank: f"{p.role} on {p.node_name}" for p in ctx.peers} \
            if layout.num_nodes > 1 else None             # the dead-rank line names the node
        self.liveness = Liveness(self.config.timeouts, self.roles, self.workers, self._on_dead,
                                 names)
        self.embedding_rows = embedding_pool_rows(self.config)
        self.requests: dict[str, _Request] = {}
        self.shutdown = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    @property
    def dead(self) -> str | None:
        return self.liveness.dead

    @property
    def rank_stats(self) -> dict[int, dict]:
        return self.placement.rank_stats

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [asyncio.ensure_future(self._recv_loop())]
        self._tasks += self.liveness.start(self.mailbox)

    async def close(self) -> None:
        self.liveness.closing = True
        if not self.dead:
            for r in self.workers:
                self._send(r, Shutdown("frontend stopped"))
            await asyncio.sleep(0.2)            # let the PUSH sockets flush
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---------------------------------------------------------------- EngineClient
    async def generate(self, request_id, prompt_token_ids, params, mm_items=(), deadline=None):
        if self.dead:
            raise unavailable(f"the job is going down: {self.dead}")
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        deadline = deadline or time.time() + self.config.server.request_timeout_s
        rows = sum({it.content_hash: it.num_tokens for it in mm_items
                    if it.embeddings is None}.values())
        if self.placement.encoders and rows > self.embedding_rows:
            raise APIError(413, f"the request's images need {rows} embedding rows; the encode "
                                f"pool has {self.embedding_rows} (cache.embedding_pool_rows)",
                           code="request_too_large")
        metas = [MMItemMeta(it.content_hash, it.offset, it.num_tokens,
                            list(it.grid_thw) if it.grid_thw else None) for it in mm_items]
        detok = IncrementalDetokenizer(self.tokenizer, params.stop,
                                       prompt_tail=prompt_token_ids[-PROMPT_TAIL:])
        keys = await self.placement.prefix_keys(prompt_token_ids, mm_items)
        hashes = dict(block_hashes=pack_hashes(keys),
                      hash_block_size=self.placement.router.block_size if keys else 0)
        enc, pre, dec = self.placement.place(keys, [it.content_hash for it in mm_items])
        ids = list(prompt_token_ids)

        def messages() -> list[tuple[int, Any]]:        # on a worker thread: pixels copied
            images = [self._image_item(it) for it in mm_items]
            if self.placement.aggregated:
                return [(dec, GenerateRequest(request_id, ids, params, metas, images, deadline,
                                              self.rank, **hashes))]
            out = [(enc, EncodeRequest(request_id, images, pre, deadline, self.rank))
                   ] if enc >= 0 else []
            return out + [(pre, PrefillRequest(request_id, ids, params, metas, dec, deadline,
                                               enc, [] if enc >= 0 else images, self.rank,
                                               **hashes))]
        sends = await asyncio.to_thread(lambda: [(d, self._frame(d, m)) for d, m in messages()])
        if self.dead:
            raise unavailable(f"the job is going down: {self.dead}")
        st = _Request(asyncio.Queue(), [r for r in (enc, pre, dec) if r >= 0], detok)
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.requests[request_id] = st
        self.placement.in_flight.update(st.ranks)
        finished = False
        try:
            for dest, frame in sends:
                self._send_frame(dest, frame)
            while not finished:
                left = deadline - time.time()
                if left <= 0:
                    raise TimeoutError(f"request {request_id} passed its deadline")
                try:
                    msg = await asyncio.wait_for(st.queue.get(), left)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"request {request_id} passed its deadline") from None
                out = self._output(request_id, st, msg)
                finished = out.finished
                yield out
        finally:
            self.requests.pop(request_id, None)
            self.placement.in_flight.subtract(st.ranks)
            if not finished:
                self._abort_everywhere(request_id, st.ranks, "abort")

    def healthy(self) -> bool:
        return self.dead is None and not self.liveness.stalled()

    def unhealthy_reason(self) -> str:
        return self.dead or "; ".join(self.liveness.stalled())

    def unavailable(self) -> str | None:
        return f"the job is going down: {self.dead}" if self.dead else None

    def stats(self) -> dict:
        self._refresh_local()
        out: dict[str, Any] = {k: 0 for k in ("num_running", "num_waiting", "num_free_blocks",
                                              "num_total_blocks")}
        for r, s in self.rank_stats.items():
            if self.roles[r] in ("prefill", "decode", "aggregated"):
                for k in out:
                    out[k] += s.get(k, 0)
        out["ranks"] = {r: dict(s, role=self.roles[r]) for r, s in self.rank_stats.items()}
        out["num_frontend_requests"] = len(self.requests)
        out["num_frontend_stalls"] = self.liveness.num_frontend_stalls
        out["frontend_stall_max_s"] = round(self.liveness.max_frontend_stall_s, 3)
        return out

    # ---------------------------------------------------------------- helpers
    def _refresh_local(self) -> None:
        if self.local is not None:
            self.rank_stats[self.rank] = dict(self.local.stats, pid=os.getpid())

    def route_from_local(self, dest: int, msg) -> None:
        """The local worker's send (on the event loop): to us, or out through the mailbox."""
        if dest == self.rank:
            self._dispatch(self.rank, msg)
        else:
            self._send(dest, msg)

    def _frame(self, dest: int, msg) -> Any:
        """What `_send_frame` takes: the message itself for the worker beside us."""
        return msg if dest == self.rank and self.local is not None else self.mailbox.frame(msg)

    def _send(self, dest: int, msg) -> None:
        self._send_frame(dest, self._frame(dest, msg))

    def _send_frame(self, dest: int, frame) -> None:
        if dest == self.rank and self.local is not None:
            self.local.inbox.put((self.rank, frame))
            return
        try:
            self.mailbox.send_frame(dest, frame)
        except Exception as e:  # noqa: BLE001 - a full queue: the rank is stuck or gone
            log.warning("frontend: cannot send to rank %d: %s", dest, e)

    def _abort_everywhere(self, rid: str, ranks: list[int], reason: str) -> None:
        if self.dead:
            return
        for r in ranks:
            self._send(r, AbortRequest(rid, reason))

    @staticmethod
    def _image_item(it) -> ImageItem:
        """What the encoding rank gets for `it`: an image's RGB pixels (the PIL image the
        frontend decoded rides `it.source`), or the embeddings file to load again."""
        if it.embeddings is not None:
            # A pre-computed embeddings file (checked and hashed here): the rank that encodes
            # loads it again by path, or from its bytes when it was fetched; no tensor leaves.
            f = it.source
            if f is None:
                raise ValueError("pre-computed embeddings without their file cannot be sent "
                                 "to another rank")
            if f.local_path:
                return ImageItem(it.content_hash, it.offset, it.num_tokens,
                                 format="embedding_file", path=f.local_path)
            return ImageItem(it.content_hash, it.offset, it.num_tokens, f.data,
                             "embedding_bytes", path=f.source)
        img = it.source
        if img is None:
            raise ValueError(f"image {it.content_hash[:12]} came without its pixels")
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return ImageItem(it.content_hash, it.offset, it.num_tokens, rgb.tobytes(), "rgb",
                         rgb.width, rgb.height)

    def _output(self, rid: str, st: _Request, msg) -> RequestOutput:
        if isinstance(msg, RequestFailed):
            if msg.status:              # refused for this request alone (a full pool, ...)
                raise APIError(msg.status, f"{msg.stage}: {msg.message}",
                               type="rate_limit_error" if msg.status == 429 else
                               "invalid_request_error", code=REFUSALS.get(msg.status))
            what = "timed out" if msg.timeout else "failed"
            return RequestOutput(rid, [], finished=True, finish_reason="error",
                                 error=f"{msg.stage} (rank {msg.rank}) {what}: {msg.message}")
        delta = "".join(st.detok.add(t) for t in msg.new_token_ids)
        if msg.finished:
            delta += st.detok.flush()
        return RequestOutput(rid, list(msg.new_token_ids), delta, msg.logprobs, msg.finished,
                             msg.finish_reason, msg.num_prompt_tokens, msg.num_cached_tokens,
                             msg.error)

    def _deliver(self, msg) -> None:
        st = self.requests.get(msg.request_id)
        if st is None:
            return
        if isinstance(msg, RequestFailed):
            self._abort_everywhere(msg.request_id, [r for r in st.ranks if r != msg.rank],
                                   "timeout" if msg.timeout else "error")
            st.queue.put_nowait(msg)
        elif msg.stage == "decode" and not st.got_first:
            st.held.append(msg)                 # decode overtook prefill's first token
        else:
            st.queue.put_nowait(msg)
            if msg.stage == "prefill":
                st.got_first = True
                for m in st.held:
                    st.queue.put_nowait(m)
                st.held.clear()

    # ---------------------------------------------------------------- tasks
    async def _recv_loop(self) -> None:
        while True:
            got = await self.mailbox.recv()
            if got is None:
                continue
            src, msg = got
            self.liveness.heard(src)
            self._dispatch(src, msg)

    def _dispatch(self, src: int, msg) -> None:
        if isinstance(msg, Heartbeat):
            self.rank_stats[msg.rank] = dict(msg.stats, beat_time=msg.time)
            self.liveness.beat(msg.rank, msg.stats)
        elif isinstance(msg, (TokenStream, RequestFailed)):
            self._deliver(msg)
        elif self.local is not None:            # for the worker beside us
            self.local.inbox.put((src, msg))

    def _on_dead(self, rank: int, line: str) -> None:
        print(f"mmhpc: error: {line}; failing {len(self.requests)} in-flight request(s) "
              f"and stopping the job", file=sys.stderr, flush=True)
        for rid, st in list(self.requests.items()):
            st.queue.put_nowait(RequestFailed(rid, rank, self.roles.get(rank, "?"), line))
        self.shutdown.set()

    async def debug_ranks(self, request):
        from aiohttp import web
        self._refresh_local()
        return web.json_response(self.liveness.report(
            self.rank_stats, [self.rank] if self.local is not None else []))

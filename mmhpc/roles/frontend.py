"""Frontend role (rank 0): the OpenAI server over `RemoteEngineClient`, which drives the
encode / prefill / decode ranks over ZeroMQ.

A request's control flow (tensors move over NIXL between workers, never through here):
    generate → pick instances (least loaded: own in-flight count + heartbeat queue depth,
    then most free KV blocks) → [EncodeRequest → encode] + PrefillRequest → prefill
    ← TokenStream(first token, prefill) ← TokenStream(..., decode) ← RequestFailed(any stage)
Leaving early, a deadline or a failure sends AbortRequest to every rank of the request.
A rank is dead when its connection closes (a ZeroMQ monitor on the PUSH socket to every
worker: the kernel closes a killed process's sockets at once, so the frontend knows within
milliseconds, before the launcher tears the job down) or when it is silent (no Heartbeat) for
timeouts.dead_rank_s (a hung rank): every in-flight request fails, ONE line names the rank and
its role, the server stops and `run` aborts the MPI job. Workers leave SIGTERM to the
frontend (it drains, then sends Shutdown), so a closing connection is never a clean stop.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import zmq

from mmhpc.engine.block_manager import INLINE_HASH_TOKENS, pack_hashes
from mmhpc.engine.detokenizer import IncrementalDetokenizer
from mmhpc.engine.outputs import RequestOutput
from mmhpc.messages.common import AbortRequest, Heartbeat, MMItemMeta, Shutdown
from mmhpc.messages.to_aggregated import GenerateRequest
from mmhpc.messages.to_encode import EncodeRequest, ImageItem
from mmhpc.messages.to_frontend import RequestFailed, TokenStream
from mmhpc.messages.to_prefill import PrefillRequest
from mmhpc.roles.router import MAX_IMAGES, Router
from mmhpc.server.engine_client import EngineClient

log = logging.getLogger(__name__)
MAX_IMAGES_KEPT = 512
ABORT_GRACE_S = 0.5             # the dead-rank line reaches the launcher before MPI_Abort
PROMPT_TAIL = 4


@dataclass
class _Request:
    queue: asyncio.Queue
    ranks: list[int]
    detok: IncrementalDetokenizer
    got_first: bool = False                     # prefill's token came (decode's wait for it)
    held: list = field(default_factory=list)


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
        self.encoders = layout.leaders("encode")
        self.prefills = layout.leaders("prefill")
        self.decoders = layout.leaders("decode")
        self.aggregated = layout.leaders("aggregated")
        self.workers = [r.rank for r in layout.ranks if r.role != "frontend" and r.rank != self.rank]
        self.roles = {r.rank: r.role for r in layout.ranks}
        self.last_seen: dict[int, float] = {}
        self.rank_stats: dict[int, dict] = {r: {} for r in self.workers}
        if local is not None:
            self.rank_stats[self.rank] = {}
        self.in_flight: Counter = Counter()
        self.router = Router(self.config.cache.block_size, self.config.deployment.cache_affinity)
        self.requests: dict[str, _Request] = {}
        self.images: OrderedDict[str, Any] = OrderedDict()
        self.dead: str | None = None
        self.closing = False
        self.shutdown = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._tasks:
            return
        now = time.monotonic()
        self.last_seen = {r: now for r in self.workers}
        self._tasks = [asyncio.ensure_future(self._recv_loop()),
                       asyncio.ensure_future(self._monitor())]
        self._tasks += [asyncio.ensure_future(self._watch(r, self.mailbox.monitor(r)))
                        for r in self.workers]

    async def close(self) -> None:
        self.closing = True
        if not self.dead:
            for r in self.workers:
                self._send(r, Shutdown("frontend stopped"))
            await asyncio.sleep(0.2)            # let the PUSH sockets flush
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def remember_image(self, content_hash: str, image) -> None:
        self.images[content_hash] = image
        self.images.move_to_end(content_hash)
        while len(self.images) > MAX_IMAGES_KEPT:
            self.images.popitem(last=False)

    # ---------------------------------------------------------------- EngineClient
    async def generate(self, request_id, prompt_token_ids, params, mm_items=(), deadline=None):
        if self.dead:
            raise RuntimeError(self.dead)
        deadline = deadline or time.time() + self.config.server.request_timeout_s
        images = [self._image_item(it) for it in mm_items]
        metas = [MMItemMeta(it.content_hash, it.offset, it.num_tokens,
                            list(it.grid_thw) if it.grid_thw else None) for it in mm_items]
        detok = IncrementalDetokenizer(self.tokenizer, params.stop,
                                       prompt_tail=prompt_token_ids[-PROMPT_TAIL:])
        keys = await self._prefix_keys(prompt_token_ids, mm_items)
        hashes = dict(block_hashes=pack_hashes(keys),
                      hash_block_size=self.router.block_size if keys else 0)
        if self.aggregated:
            enc, pre = -1, -1
            dec = self._pick(self.aggregated, self._routing(self.aggregated, keys))
        else:
            enc = -1
            if self.encoders and images:
                enc = self._pick(self.encoders, [it.content_hash for it in mm_items]
                                 if self.router.wants_keys(self.encoders) else [], prefix=False)
            pre = self._pick(self.prefills, self._routing(self.prefills, keys))
            dec = self._pick(self.decoders)
        st = _Request(asyncio.Queue(), [r for r in (enc, pre, dec) if r >= 0], detok)
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.requests[request_id] = st
        self.in_flight.update(st.ranks)
        finished = False
        try:
            if self.aggregated:
                self._send(dec, GenerateRequest(request_id, list(prompt_token_ids), params, metas,
                                                images, deadline, self.rank, **hashes))
            if enc >= 0:
                self._send(enc, EncodeRequest(request_id, images, pre, deadline, self.rank))
            if pre >= 0:
                self._send(pre, PrefillRequest(request_id, list(prompt_token_ids), params, metas,
                                               dec, deadline, enc, [] if enc >= 0 else images,
                                               self.rank, **hashes))
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
            self.in_flight.subtract(st.ranks)
            if not finished:
                self._abort_everywhere(request_id, st.ranks, "abort")

    def healthy(self) -> bool:
        return self.dead is None

    def stats(self) -> dict:
        self._refresh_local()
        out: dict[str, Any] = {k: 0 for k in ("num_running", "num_waiting", "num_free_blocks",
                                              "num_total_blocks")}
        for r, s in self.rank_stats.items():
            if self.roles[r] in ("prefill", "decode", "aggregated"):
                for k in out:
                    out[k] += s.get(k, 0)
        out["ranks"] = {r: dict(s, role=self.roles[r]) for r, s in self.rank_stats.items()}
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

    def _send(self, dest: int, msg) -> None:
        if dest == self.rank and self.local is not None:
            self.local.inbox.put((self.rank, msg))
            return
        try:
            self.mailbox.send(dest, msg)
        except Exception as e:  # noqa: BLE001 - a full queue: the rank is stuck or gone
            log.warning("frontend: cannot send %s to rank %d: %s", type(msg).__name__, dest, e)

    def _abort_everywhere(self, rid: str, ranks: list[int], reason: str) -> None:
        if self.dead:
            return
        for r in ranks:
            self._send(r, AbortRequest(rid, reason))

    async def _prefix_keys(self, prompt_token_ids, mm_items) -> list[int]:
        """The prompt's prefix-cache block hashes: for the router, and sent with the request so
        the prefill / aggregated rank's scheduler need not make them (~4 µs a block, on the
        GPU's critical path there); a long prompt is hashed off the event loop."""
        if not self.config.cache.enable_prefix_caching:
            return []
        ids = list(prompt_token_ids)
        items = sorted(mm_items, key=lambda it: it.offset)
        if len(ids) > INLINE_HASH_TOKENS:
            return await asyncio.to_thread(self.router.prompt_keys, ids, items)
        return self.router.prompt_keys(ids, items)

    def _routing(self, ranks: list[int], keys: list[int]) -> list[int]:
        """`keys` where they can change the pick among `ranks` (else none: nothing recorded)."""
        return keys if self.router.wants_keys(ranks) else []

    def _pick(self, ranks: list[int], keys: list = (), prefix: bool = True) -> int:
        """Least loaded (own in-flight count + reported queue, then most free blocks), where
        the prompt's block hashes (`prefix`) or the images' content hashes in `keys` count as
        cached on the rank they were last sent to (mmhpc.roles.router)."""
        self._refresh_local()

        def load(r: int) -> tuple[float, int]:
            s = self.rank_stats.get(r, {})
            return (self.in_flight[r] + s.get("num_waiting", 0) + s.get("num_waiting_kv", 0),
                    s.get("num_free_blocks", 0))
        rank = self.router.pick(ranks, load, keys, prefix)
        capacity = (self.rank_stats.get(rank, {}).get("num_total_blocks", 1 << 20) if prefix
                    else MAX_IMAGES)
        self.router.record(rank, keys, capacity)
        return rank

    def _image_item(self, it) -> ImageItem:
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
        img = self.images.get(it.content_hash)
        if img is None:
            raise ValueError(f"image {it.content_hash[:12]} is not held by the frontend")
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return ImageItem(it.content_hash, it.offset, it.num_tokens, rgb.tobytes(), "rgb",
                         rgb.width, rgb.height)

    def _output(self, rid: str, st: _Request, msg) -> RequestOutput:
        if isinstance(msg, RequestFailed):
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
            self.last_seen[src] = time.monotonic()
            self._dispatch(src, msg)

    def _dispatch(self, src: int, msg) -> None:
        if isinstance(msg, Heartbeat):
            self.rank_stats[msg.rank] = msg.stats
        elif isinstance(msg, (TokenStream, RequestFailed)):
            self._deliver(msg)
        elif self.local is not None:            # for the worker beside us
            self.local.inbox.put((src, msg))

    async def _monitor(self) -> None:
        limit = self.config.timeouts.dead_rank_s
        while not self.dead:
            await asyncio.sleep(min(1.0, self.config.timeouts.heartbeat_s / 2))
            now = time.monotonic()
            for r in self.workers:
                if now - self.last_seen[r] > limit:
                    self._rank_dead(r, f"no heartbeat for {now - self.last_seen[r]:.1f}s")
                    break

    async def _watch(self, rank: int, mon) -> None:
        from zmq.utils.monitor import parse_monitor_message
        try:
            while True:
                event = parse_monitor_message(await mon.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED and not self.closing:
                    self._rank_dead(rank, "its connection closed (the process is gone)")
                    return
        finally:
            mon.close(linger=0)

    def _rank_dead(self, rank: int, why: str) -> None:
        if self.dead or self.closing:
            return
        node = f" on {self.ctx.peers[rank].node_name}" \
            if self.ctx.layout.num_nodes > 1 and rank < len(self.ctx.peers) else ""
        self.dead = f"rank {rank} ({self.roles.get(rank, '?')}{node}) is dead: {why}"
        print(f"mmhpc: error: {self.dead}; failing {len(self.requests)} in-flight request(s) "
              f"and stopping the job", file=sys.stderr, flush=True)
        for rid, st in list(self.requests.items()):
            st.queue.put_nowait(RequestFailed(rid, rank, self.roles.get(rank, "?"), self.dead))
        self.shutdown.set()

    async def debug_ranks(self, request):
        from aiohttp import web
        self._refresh_local()
        now = time.monotonic()
        ranks = self.workers + ([self.rank] if self.local is not None else [])
        return web.json_response({str(r): dict(self.rank_stats.get(r, {}), role=self.roles[r],
                                               silent_s=round(now - self.last_seen.get(r, now), 3))
                                  for r in sorted(ranks)})


class FrontendProcessor:
    """The InputProcessor as the disaggregated frontend uses it: images are counted (token
    numbers, grids), not preprocessed; the decoded images wait in the client for dispatch."""

    def __init__(self, processor, client: RemoteEngineClient) -> None:
        self._processor = processor
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)

    def process(self, prompt: str, images=()):
        ids, items = self._processor.process(prompt, images, with_pixels=False)
        for item, image in zip(items, images):
            if item.embeddings is None:
                self._client.remember_image(item.content_hash, image)
        return ids, items


def run(ctx, local=None) -> None:
    """Serve HTTP on this rank; `local`: the worker sharing it (its loop runs in a thread)."""
    import threading
    from mmhpc.multimodal.processor import InputProcessor
    from mmhpc.server.app import build_app, serve

    processor = InputProcessor(ctx.config.model.path)
    client = RemoteEngineClient(ctx, processor, local)
    fp = FrontendProcessor(processor, client)
    app = build_app(ctx.config, client, fp)
    app.router.add_get("/debug/ranks", client.debug_ranks)

    def ready(url: str) -> None:
        try:
            from mmhpc.launch.url_file import write_url_file
            write_url_file(url)
        except Exception:  # noqa: BLE001 - the URL file is a convenience
            pass

    async def main() -> None:
        client.shutdown = asyncio.Event()
        thread = None
        if local is not None:
            loop = asyncio.get_running_loop()

            def route(dest: int, msg) -> None:
                try:
                    loop.call_soon_threadsafe(client.route_from_local, dest, msg)
                except RuntimeError:            # the loop closed at shutdown
                    pass

            def beside() -> None:
                try:
                    local.run_beside_frontend(route)
                except BaseException as e:  # noqa: BLE001
                    log.exception("rank %d: %s loop failed", ctx.rank, ctx.role)
                    loop.call_soon_threadsafe(client._rank_dead, ctx.rank,
                                              f"its engine loop failed: {e!r}")

            thread = threading.Thread(target=beside, name=f"mmhpc-{ctx.role}", daemon=True)
            thread.start()
        try:
            await serve(ctx.config, client, fp, shutdown=client.shutdown, on_ready=ready,
                        app=app, note=ctx.layout.summary())
        finally:
            if thread is not None:
                local.stopping.set()
                local.inbox.put((ctx.rank, Shutdown("frontend stopped")))
                await asyncio.to_thread(thread.join, 10.0)

    asyncio.run(main())
    if client.dead:                  # outside asyncio: take every rank down
        sys.stderr.flush()
        # The launcher forwards rank 0's stderr through a pipe; MPI_Abort tears the job down
        # at once, and a busy launcher could drop the one line that says which rank died.
        time.sleep(ABORT_GRACE_S)
        ctx.comm.Abort(1)

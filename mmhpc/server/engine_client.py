"""What the HTTP frontend talks to: `EngineClient`. `LocalEngineClient` runs an engine (an
`interface.AggregatedEngine`: LLMEngine, or the transformers backend) in its own thread; a
distributed client (E/P/D over ZeroMQ) implements the same methods.

Protocol of the engine thread (the only thread that touches the engine):
    loop: drain commands (add / abort / stop; block while idle) → step() → outputs to the
          per-request asyncio queues through loop.call_soon_threadsafe.
A failing add_request fails that request only. A failing step() fails the request it names
(`exc.request_id`); if it names none, the suspects: requests with no output yet (new inputs:
images to encode, prompts to prefill), or every request if none is new. The thread lives on. Repeated step failures, a dead thread or a step that runs past `wedge_timeout_s`
make `healthy()` False (the frontend's /health turns 503).
"""
from __future__ import annotations

import abc
import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator, Optional, Sequence

from mmhpc.distributed.group import get_tp
from mmhpc.engine.block_manager import INLINE_HASH_TOKENS
from mmhpc.engine.outputs import RequestOutput
from mmhpc.engine.sequence import MMItem, SamplingParams

log = logging.getLogger(__name__)
IDLE_WAKE_S = 5.0


class EngineClient(abc.ABC):
    """The engine as the frontend sees it. All coroutines run on the frontend's event loop."""

    async def start(self) -> None:
        """Called once on the serving loop before the first request."""

    async def close(self) -> None:
        """Called once at shutdown, after in-flight requests drained."""

    @abc.abstractmethod
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 mm_items: Sequence[MMItem] = (), deadline: Optional[float] = None
                 ) -> AsyncIterator[RequestOutput]:
        """Async iterator of the request's outputs (token deltas), ending with one whose
        `finished` is True (finish_reason "error" + `error` when the engine failed it).
        `deadline` is absolute `time.time()`; past it the request is aborted and TimeoutError
        raised. Leaving the iteration early (break, cancellation, aclose) aborts the request
        and frees its resources."""

    @abc.abstractmethod
    def healthy(self) -> bool:
        """False when the engine is dead or wedged."""

    def unavailable(self) -> Optional[str]:
        """Why no request can be served any more (a dead engine), else None: new requests
        get 503 with this line."""
        return None

    def unhealthy_reason(self) -> str:
        """Why `healthy()` is False (for /health), "" if it is not."""
        return ""

    @abc.abstractmethod
    def stats(self) -> dict:
        """num_running, num_waiting, num_free_blocks, num_total_blocks (and anything else)."""


class LocalEngineClient(EngineClient):
    MAX_CONSECUTIVE_FAILURES = 3

    def __init__(self, engine, wedge_timeout_s: float = 120.0) -> None:
        self.engine = engine
        self.processor = getattr(engine, "processor", None)
        self.wedge_timeout_s = wedge_timeout_s
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue] = {}      # event-loop side only
        self._live: set[str] = set()                      # engine-thread side only
        self._fresh: set[str] = set()                     # live, no output yet
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stats: dict = {}
        self._step_started: Optional[float] = None
        self._failures = 0
        self._stopping = False
        self.num_step_errors = 0

    # -- event-loop side
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stats = self._engine_stats()
        self._thread = threading.Thread(target=self._run, name="mmhpc-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        if self._thread is None:
            return
        self._cmds.put(("stop",))
        await asyncio.to_thread(self._thread.join, 30.0)

    async def generate(self, request_id, prompt_token_ids, params, mm_items=(), deadline=None):
        if self._thread is None:
            await self.start()
        if request_id in self._queues:
            raise ValueError(f"duplicate request id {request_id!r}")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        ids, items = list(prompt_token_ids), list(mm_items)
        # the prefix-cache hashes made here, not in the engine thread's next schedule (it
        # waits on the GPU meanwhile); a long prompt off the event loop
        try:        # None: the engine caches no prefixes
            hashes = (await asyncio.to_thread(self.engine.prompt_block_hashes, ids, items)
                      if len(ids) > INLINE_HASH_TOKENS
                      else self.engine.prompt_block_hashes(ids, items))
        except Exception:  # noqa: BLE001 - the engine's add_request says what is wrong
            hashes = None
        self._cmds.put(("add", request_id, ids, params, items, hashes))
        finished = False
        try:
            while not finished:
                if deadline is None:
                    out = await q.get()
                else:
                    left = deadline - time.time()
                    if left <= 0:
                        raise TimeoutError(f"request {request_id} passed its deadline")
                    out = await asyncio.wait_for(q.get(), left)
                finished = out.finished
                yield out
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._cmds.put(("abort", request_id))

    def healthy(self) -> bool:
        if self._thread is None or not self._thread.is_alive():
            return False
        if self._failures >= self.MAX_CONSECUTIVE_FAILURES:
            return False
        started = self._step_started
        return started is None or time.monotonic() - started < self.wedge_timeout_s

    def unavailable(self) -> Optional[str]:
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return "the engine thread is dead"
        return None

    def stats(self) -> dict:
        return dict(self._stats)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    # -- engine-thread side
    def _send(self, outputs: list[RequestOutput]) -> None:
        if outputs and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._deliver, outputs)
            except RuntimeError:      # loop closed under us at shutdown
                pass

    def _engine_stats(self) -> dict:
        try:
            return dict(self.engine.stats())
        except Exception:  # noqa: BLE001
            return dict(self._stats)

    def _fail(self, request_id: str, err: str) -> RequestOutput:
        self._live.discard(request_id)
        self._fresh.discard(request_id)
        try:
            self.engine.abort_request(request_id)
        except Exception:  # noqa: BLE001 - it may never have been added
            pass
        return RequestOutput(request_id, [], finished=True, finish_reason="error", error=err)

    def _handle(self, cmd: tuple) -> list[RequestOutput]:
        if cmd[0] == "add":
            _, rid, ids, params, items, hashes = cmd
            try:
                self.engine.add_request(rid, ids, params, items, block_hashes=hashes)
                self._live.add(rid)
                self._fresh.add(rid)
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the engine
                log.warning("add_request %s failed: %r", rid, e)
                return [self._fail(rid, f"{type(e).__name__}: {e}")]
        elif cmd[0] == "abort":
            if cmd[1] in self._live:
                self._live.discard(cmd[1])
                self._fresh.discard(cmd[1])
                try:
                    self.engine.abort_request(cmd[1])
                except Exception as e:  # noqa: BLE001
                    log.warning("abort_request %s failed: %r", cmd[1], e)
        elif cmd[0] == "stop":
            self._stopping = True
        return []

    def _run(self) -> None:
        while not self._stopping:
            outputs: list[RequestOutput] = []
            try:   # block only while the engine is idle (a TP leader wakes to keep its
                # followers' collective alive)
                cmd = (self._cmds.get_nowait() if self.engine.has_unfinished_requests()
                       else self._cmds.get(timeout=min(IDLE_WAKE_S, get_tp().timeout_s / 8)))
            except queue.Empty:
                cmd = None
                get_tp().keep_alive()
            while cmd is not None:
                outputs += self._handle(cmd)
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    cmd = None
            if not self._stopping and self.engine.has_unfinished_requests():
                outputs += self._step()
            self._stats = self._engine_stats()
            self._send(outputs)
        for rid in list(self._live):
            self._send([self._fail(rid, "server shutting down")])

    def _step(self) -> list[RequestOutput]:
        self._step_started = time.monotonic()
        try:
            outputs = self.engine.step()
            self._failures = 0
        except Exception as e:  # noqa: BLE001 - fail the request(s), keep the thread
            self._failures += 1
            self.num_step_errors += 1
            rid = getattr(e, "request_id", None)
            victims = [rid] if rid in self._live else sorted(self._fresh or self._live)
            log.exception("engine step failed; failing %s", victims)
            return [self._fail(r, f"engine error: {type(e).__name__}: {e}") for r in victims]
        finally:
            self._step_started = None
        for out in outputs:
            self._fresh.discard(out.request_id)
            if out.finished:
                self._live.discard(out.request_id)
        return outputs

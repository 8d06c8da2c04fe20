"""The OpenAI-compatible HTTP frontend (aiohttp) over an `EngineClient`.

A chat request's life here: parse + validate (protocol) → fetch/decode media (media, worker
threads) → chat template + tokenize + placeholder expansion (processor, worker thread) →
n engine requests → JSON or SSE. Leaving early (client gone, deadline) closes the engine
iterators, which aborts the engine requests and frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

from aiohttp import web

from mmhpc.config import Config
from mmhpc.engine.outputs import RequestOutput
from mmhpc.server import protocol as P
from mmhpc.server.engine_client import EngineClient
from mmhpc.server.image_budget import ImageBudget
from mmhpc.server.media import Embeddings, MediaLoader, deepstack_levels, text_hidden_size
from mmhpc.server.metrics import Metrics
from mmhpc.server.protocol import APIError

log = logging.getLogger(__name__)
FRONTEND = web.AppKey("mmhpc_frontend", object)
INLINE_JSON_BYTES = 1 << 16


def served_model_name(config: Config) -> str:
    return config.model.name or Path(config.model.path.rstrip("/")).name


def model_aliases(config: Config) -> frozenset[str]:
    """Other ids a request may name the served model by: the `model.path` string (vLLM's and
    trtllm-serve's default id), with or without a trailing slash."""
    path = config.model.path.rstrip("/")
    return frozenset({path, path + "/"}) - {served_model_name(config)}


class _Choice:
    """Accumulates one choice's outputs (non-streaming)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.num_tokens = 0
        self.logprobs: list = []
        self.reason: Optional[str] = None
        self.num_prompt = 0
        self.num_cached = 0


class Frontend:
    def __init__(self, config: Config, client: EngineClient, processor) -> None:
        self.config = config
        self.client = client
        self.processor = processor
        self.model = served_model_name(config)
        self.aliases = model_aliases(config)
        self.max_model_len = config.model.max_model_len
        self.media = MediaLoader(config.media, text_hidden_size(config.model.path),
                                 max_tokens=self.max_model_len,
                                 deepstack=deepstack_levels(config.model.path))
        self.images = ImageBudget(config.media)
        self.metrics = Metrics()
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self.created = int(time.time())
        self.vocab_size = len(processor.tokenizer)
        self.token_str = functools.lru_cache(maxsize=1 << 16)(
            lambda tid: processor.tokenizer.decode([tid]))

    # ------------------------------------------------------------------------- plumbing
    @contextlib.contextmanager
    def _admit(self, endpoint: str):
        """Counts the request in flight; refuses it while draining or over the limit."""
        if self.draining or not self.ready:
            raise APIError(503, "server is shutting down" if self.draining else "server not ready",
                           type="service_unavailable", code="unavailable")
        gone = self.client.unavailable()
        if gone:
            raise APIError(503, gone, type="service_unavailable", code="unavailable")
        if self.in_flight >= self.config.server.max_concurrent_requests:
            raise APIError(429, "too many concurrent requests", type="rate_limit_error",
                           code="rate_limit_exceeded")
        self.in_flight += 1
        self.metrics.in_flight = self.in_flight
        t0 = time.monotonic()
        status = {"code": 200}
        try:
            yield status
        except APIError as e:
            status["code"] = e.status
            raise
        except (asyncio.CancelledError, ConnectionError):   # the client left
            status["code"] = 499
            self.metrics.aborted += 1
            raise
        except Exception:
            status["code"] = 500
            raise
        finally:
            self.in_flight -= 1
            self.metrics.in_flight = self.in_flight
            self.metrics.request_done(endpoint, status["code"], time.monotonic() - t0)

    async def _body(self, request: web.Request) -> dict:
        raw = await request.read()
        # images inline: MBs of JSON, parsed off the loop
        body = await self.media.run(P.parse_json, raw) if len(raw) > INLINE_JSON_BYTES \
            else P.parse_json(raw)
        if isinstance(body.get("model"), str) and body["model"] in self.aliases:
            body["model"] = self.model          # the path names the served model too
        return body

    def _deadline(self) -> float:
        return time.time() + self.config.server.request_timeout_s

    async def _outputs(self, rid: str, prompt_ids: list[int], items: list, params: list,
                       deadline: float, t0: float) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) from n engine requests, interleaved as they come."""
        gens = [self.client.generate(f"{rid}-{i}", prompt_ids, p,
                                     [copy.copy(it) for it in items], deadline)
                for i, p in enumerate(params)]
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen) -> None:
            try:
                async with contextlib.aclosing(gen):
                    async for out in gen:
                        q.put_nowait((i, out))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                q.put_nowait((i, e))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
        first = True
        last: dict[int, float] = {}             # choice -> its last output's time
        ttft: dict[int, float] = {}
        num_tokens: dict[int, int] = {}
        try:
            for _ in range(len(gens)):
                while True:
                    i, out = await q.get()
                    if isinstance(out, BaseException):
                        raise out
                    now = time.monotonic()
                    if out.new_token_ids:
                        if first:
                            first = False
                            self.metrics.ttft.observe(now - t0)
                        if i in last:
                            self.metrics.itl.observe(now - last[i])
                        last[i] = now
                        ttft.setdefault(i, now - t0)
                        num_tokens[i] = num_tokens.get(i, 0) + len(out.new_token_ids)
                    self.metrics.generation_tokens += len(out.new_token_ids)
                    if out.finished and out.finish_reason not in ("error", "abort"):
                        self.metrics.request_finished(ttft.get(i, now - t0), now - t0,
                                                      num_tokens.get(i, 0))
                    yield i, out
                    if out.finished:
                        break
        except TimeoutError:
            raise APIError(504, "request timed out", type="timeout_error", code="timeout") from None
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _check_output(self, out: RequestOutput) -> None:
        if out.finish_reason == "error" or out.error:
            raise APIError(500, f"engine error: {out.error or 'request failed'}",
                           type="server_error", code="engine_error")
        if out.finish_reason == "abort":
            raise APIError(503, "request was aborted by the engine", type="server_error",
                           code="aborted")

    # ------------------------------------------------------------------------- inputs
    @staticmethod
    def _processor_input(item: Any) -> Any:
        """Embeddings → the processor's input {"embeddings", "grid_thw", "file"} (grid from the
        file's grid_thw / image_grid_thw, else the default; "file" lets a disaggregated
        frontend ship the file itself); images pass as they are."""
        if isinstance(item, Embeddings):
            return item.processor_input()
        return item

    def _tokenize_chat(self, messages: list[dict], media: list) -> tuple[list[int], list]:
        token = self.processor.image_token
        for i, m in enumerate(messages):
            for part in m["content"]:
                if part["type"] == "text" and token in part["text"]:
                    raise P.bad(f"messages[{i}] text contains the image placeholder {token!r}; "
                                f"send images as image_url parts", param=f"messages[{i}]",
                                code="image_placeholder_in_text")
        prompt = self.processor.apply_chat_template(messages)
        return self._process(prompt, [self._processor_input(x) for x in media], "messages")

    async def _chat_inputs(self, req: P.ChatRequest, hold) -> tuple[list[int], list]:
        """Media fetched and decoded, chat template, tokens: (prompt ids, MMItems); `hold`
        (an ImageBudget hold) takes the decoded images' bytes (413 / 429 past the budget)."""
        try:
            async with asyncio.timeout(self.config.server.request_timeout_s):
                media = await self.media.load_all([(m.url, m.param) for m in req.media])
                hold.take(sum(self.images.size(x) for x in media))
                return await self.media.run(self._tokenize_chat, req.messages, media)
        except TimeoutError:
            raise APIError(504, "timed out preparing the request", type="timeout_error",
                           code="timeout") from None

    def _process(self, prompt: str, inputs: list, param: str) -> tuple[list[int], list]:
        try:
            return self.processor.process(prompt, inputs)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise P.bad(f"cannot process the prompt: {e}", param=param,
                        code="invalid_prompt") from None

    def _tokenize_completion(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list):
            if self.processor.image_token_id in prompt:
                raise P.bad("prompt token ids contain the image placeholder; /v1/completions "
                            "takes no images", param="prompt", code="invalid_prompt")
            return list(prompt)
        return self._process(prompt, [], "prompt")[0]

    # ------------------------------------------------------------------------- outputs
    async def _collect(self, outputs, num_choices: int) -> list[_Choice]:
        """Drains `outputs` into one _Choice per index (non-streaming)."""
        choices = [_Choice() for _ in range(num_choices)]
        async with contextlib.aclosing(outputs):
            async for i, out in outputs:
                self._check_output(out)
                c = choices[i]
                c.text.append(out.text_delta)
                c.num_tokens += len(out.new_token_ids)
                c.logprobs += out.logprobs or []
                c.num_cached = max(c.num_cached, out.num_cached_tokens)
                if out.finished:
                    c.reason = P.finish_reason(out)
        return choices

    async def _start_sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    async def _stream(self, request: web.Request, obj: str, rid: str, outputs,
                      choice: Callable[[int, RequestOutput], Optional[dict]], num_prompt: int,
                      include_usage: bool, first: list[dict]) -> web.StreamResponse:
        """SSE: a chunk for each choice in `first`, then one for each output that `choice` turns
        into a choice (None: nothing to send), the usage chunk if asked, [DONE]. An error midway
        is sent as an error event; a client gone closes `outputs` (→ engine requests aborted)."""
        created = int(time.time())
        resp = await self._start_sse(request)
        num_completion = 0
        cached: dict[int, int] = {}             # choice -> prompt tokens from the prefix cache

        def chunk(choices: list[dict], u: Optional[dict] = None) -> bytes:
            return P.sse(P.response(obj, rid, self.model, choices, u, created))
        try:
            for c in first:
                await resp.write(chunk([c]))
            async with contextlib.aclosing(outputs):
                async for i, out in outputs:
                    self._check_output(out)
                    num_completion += len(out.new_token_ids)
                    cached[i] = max(cached.get(i, 0), out.num_cached_tokens)
                    c = choice(i, out)
                    if c is not None:
                        await resp.write(chunk([c]))
            self.metrics.cached_tokens += sum(cached.values())     # as the non-streamed
            if include_usage:
                await resp.write(chunk([], P.usage(num_prompt, num_completion, cached.get(0, 0))))
            await resp.write(P.SSE_DONE)
        except APIError as e:
            if not await _write_quietly(resp, P.sse(e.body()) + P.SSE_DONE):
                self.metrics.aborted += 1
                return resp
        except ConnectionError:                 # the client left
            self.metrics.aborted += 1
            return resp
        if not await _write_quietly(resp, None):
            self.metrics.aborted += 1
        return resp

    def _chat_delta(self, logprobs: bool, i: int, out: RequestOutput) -> Optional[dict]:
        reason = P.finish_reason(out)
        lps = P.chat_logprobs(out.logprobs or [], self.token_str) if logprobs else None
        if not out.text_delta and reason is None and not lps:
            return None
        return P.chat_delta(i, {"content": out.text_delta} if out.text_delta else {}, reason, lps)

    def _completion_delta(self, logprobs: bool, i: int, out: RequestOutput) -> Optional[dict]:
        reason = P.finish_reason(out)
        if not out.text_delta and reason is None and not out.logprobs:
            return None
        lps = P.completion_logprobs(out.logprobs or [], self.token_str) if logprobs else None
        return P.completion_choice(i, out.text_delta, reason, lps)

    # ------------------------------------------------------------------------- routes
    async def chat(self, request: web.Request) -> web.StreamResponse:
        with self._admit("chat"), contextlib.ExitStack() as stack:
            t0 = time.monotonic()
            body = await self._body(request)
            req = P.parse_chat(body, self.model, self.config.media.max_images_per_request,
                               self.vocab_size)
            deadline = self._deadline()
            hold = stack.enter_context(self.images.hold())
            ids, items = await self._chat_inputs(req, hold)
            self.metrics.media.observe(time.monotonic() - t0)
            params = [req.sampling.params(len(ids), self.max_model_len, i)
                      for i in range(req.sampling.n)]
            self.metrics.prompt_tokens += len(ids)
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            outputs = self._outputs(rid, ids, items, params, deadline, t0)
            if req.stream:
                role = [P.chat_delta(i, {"role": "assistant", "content": ""})
                        for i in range(len(params))]
                return await self._stream(request, P.CHAT_CHUNK, rid, outputs,
                                          functools.partial(self._chat_delta, req.logprobs),
                                          len(ids), req.include_usage, role)
            choices = await self._collect(outputs, len(params))
            self.metrics.cached_tokens += sum(c.num_cached for c in choices)
            return web.json_response(P.response(P.CHAT, rid, self.model, [
                P.chat_choice(i, "".join(c.text), c.reason,
                              P.chat_logprobs(c.logprobs, self.token_str) if req.logprobs else None)
                for i, c in enumerate(choices)],
                P.usage(len(ids), sum(c.num_tokens for c in choices), choices[0].num_cached)))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        with self._admit("completions"):
            t0 = time.monotonic()
            body = await self._body(request)
            req = P.parse_completion(body, self.model, self.vocab_size)
            deadline = self._deadline()
            prompt_ids = [await asyncio.to_thread(self._tokenize_completion, p)
                          for p in req.prompts]
            n = req.sampling.n
            rid = f"cmpl-{uuid.uuid4().hex}"
            num_prompt = sum(len(ids) for ids in prompt_ids)
            self.metrics.prompt_tokens += num_prompt
            streams = []
            for k, ids in enumerate(prompt_ids):
                params = [req.sampling.params(len(ids), self.max_model_len, k * n + i, "prompt")
                          for i in range(n)]
                streams.append(self._outputs(f"{rid}-{k}", ids, [], params, deadline, t0))
            merged = _merge_indexed(streams, n)
            lp = req.sampling.logprobs is not None
            if req.stream:
                return await self._stream(request, P.COMPLETION, rid, merged,
                                          functools.partial(self._completion_delta, lp),
                                          num_prompt, req.include_usage, [])
            choices = await self._collect(merged, len(prompt_ids) * n)
            self.metrics.cached_tokens += sum(c.num_cached for c in choices)
            return web.json_response(P.response(P.COMPLETION, rid, self.model, [
                P.completion_choice(i, "".join(c.text), c.reason,
                                    P.completion_logprobs(c.logprobs, self.token_str) if lp else None)
                for i, c in enumerate(choices)],
                P.usage(num_prompt, sum(c.num_tokens for c in choices))))

    async def tokenize(self, request: web.Request) -> web.Response:
        """POST /tokenize (vLLM's): {"prompt": str} or {"messages": [...]} (images fetched and
        expanded into their placeholder tokens, as a chat request would) → the token ids."""
        with self._admit("tokenize"):
            body = await self._body(request)
            if "messages" in body:
                req = P.parse_chat(body, self.model, self.config.media.max_images_per_request,
                                   self.vocab_size)
                with self.images.hold() as hold:
                    ids, _ = await self._chat_inputs(req, hold)
            else:
                P.check_model(body, self.model)
                if not isinstance(body.get("prompt"), str):
                    raise P.bad("'prompt' must be a string (or send 'messages')", param="prompt")
                ids = await asyncio.to_thread(self._tokenize_completion, body["prompt"])
            return web.json_response({"count": len(ids), "max_model_len": self.max_model_len,
                                      "tokens": ids})

    async def detokenize(self, request: web.Request) -> web.Response:
        """POST /detokenize (vLLM's): {"tokens": [ids]} → {"prompt": text}."""
        with self._admit("detokenize"):
            body = await self._body(request)
            P.check_model(body, self.model)
            tokens = body.get("tokens")
            if not (isinstance(tokens, list) and all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size
                    for t in tokens)):
                raise P.bad(f"'tokens' must be a list of token ids in [0, {self.vocab_size})",
                            param="tokens")
            text = await asyncio.to_thread(self.processor.tokenizer.decode, tokens)
            return web.json_response({"prompt": text})

    def _model_card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created,
                "owned_by": "mmhpc", "max_model_len": self.max_model_len}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model} (the openai client's `models.retrieve`)."""
        name = request.match_info["model"]
        if name != self.model and name not in self.aliases:
            raise APIError(404, f"The model '{name}' does not exist (this server serves "
                                f"'{self.model}')", param="model", code="model_not_found")
        return web.json_response(self._model_card())

    async def health(self, request: web.Request) -> web.Response:
        if not self.ready or self.draining:
            why = "draining" if self.draining else "starting"
        elif not self.client.healthy():
            why = self.client.unavailable() or self.client.unhealthy_reason() or "engine unhealthy"
        else:
            return web.json_response({"status": "ok"})
        return web.json_response(APIError(503, why, type="service_unavailable",
                                          code="unhealthy").body(), status=503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        text = self.metrics.render(self.client.stats(), self.client.healthy())
        return web.Response(text=text, content_type="text/plain",
                            headers={"X-Content-Type": "version=0.0.4"})


async def _write_quietly(resp: web.StreamResponse, data: Optional[bytes]) -> bool:
    """Write `data` (if any), then end the stream; False: the client had gone."""
    try:
        if data is not None:
            await resp.write(data)
        await resp.write_eof()
        return True
    except (ConnectionError, RuntimeError):     # reset, or the transport already closed
        return False


async def _merge_indexed(streams: list, n: int) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Prompt k's choice i → index k*n+i. One prompt (the usual case) passes straight through."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as s:
            async for item in s:
                yield item
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, s) -> None:
        try:
            async with contextlib.aclosing(s):
                async for i, out in s:
                    q.put_nowait((k * n + i, out))
        except BaseException as e:  # noqa: BLE001
            q.put_nowait((None, e))
        finally:
            q.put_nowait((None, None))

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        done = 0
        while done < len(tasks):
            idx, out = await q.get()
            if idx is None:
                if isinstance(out, BaseException) and not isinstance(out, asyncio.CancelledError):
                    raise out
                done += out is None
                continue
            yield idx, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as e:
        return web.json_response(e.body(), status=e.status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
        return web.json_response(APIError(e.status, e.reason or str(e), type=kind, code=code)
                                 .body(), status=e.status)
    except asyncio.CancelledError:
        raise
    except ConnectionError:             # the client left before its answer: nobody to tell
        return web.Response(status=499)
    except Exception as e:  # noqa: BLE001 - one request's bug must not take the server down
        log.exception("unhandled error in %s", request.path)
        return web.json_response(APIError(500, f"internal error: {type(e).__name__}",
                                          type="server_error", code="internal_error").body(),
                                 status=500)


def build_app(config: Config, engine_client: EngineClient, processor) -> web.Application:
    """The aiohttp application. `processor`: an InputProcessor (tokenizer, chat template)."""
    m = config.media
    max_body = int(max(8.0, 1.4 * m.max_images_per_request * m.max_image_mb) * (1 << 20))
    app = web.Application(client_max_size=max_body, middlewares=[_errors])
    fe = Frontend(config, engine_client, processor)
    app[FRONTEND] = fe
    app.router.add_post("/v1/chat/completions", fe.chat)
    app.router.add_post("/v1/completions", fe.completions)
    app.router.add_get("/v1/models", fe.models)
    app.router.add_get("/v1/models/{model:.+}", fe.retrieve_model)
    app.router.add_post("/tokenize", fe.tokenize)
    app.router.add_post("/detokenize", fe.detokenize)
    app.router.add_get("/health", fe.health)
    app.router.add_get("/metrics", fe.metrics_text)
    return app


def frontend(app: web.Application) -> Frontend:
    return app[FRONTEND]


async def serve(config: Config, engine_client: EngineClient, processor, *,
                shutdown: Optional[asyncio.Event] = None,
                on_ready: Optional[Callable[[str], None]] = None,
                app: Optional[web.Application] = None, note: str = "") -> None:
    """Serve until SIGTERM/SIGINT (main thread) or `shutdown` is set; then stop accepting,
    drain in-flight requests (up to server.request_timeout_s) and return. `app`: one already
    made by `build_app` (to keep a handle on it); by default a new one. `note` follows the
    URL on the ready line (the launcher's: the layout)."""
    app = app or build_app(config, engine_client, processor)
    fe = frontend(app)
    await engine_client.start()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=5.0)
    await runner.setup()
    host = config.server.host
    site = web.TCPSite(runner, host, config.server.port, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    stop = shutdown or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            signals.append(sig)
    fe.ready = True
    print(f"mmhpc ready: {url}" + (f" ({note})" if note else ""), flush=True)
    if on_ready is not None:
        on_ready(url)
    try:
        await stop.wait()
        fe.draining = True
        await site.stop()                   # no new connections
        drain_end = time.monotonic() + config.server.request_timeout_s
        while fe.in_flight and time.monotonic() < drain_end:
            await asyncio.sleep(0.05)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        await engine_client.close()


def run_local(config: Config, *, shutdown: Optional[asyncio.Event] = None,
              on_ready: Optional[Callable[[str], None]] = None) -> None:
    """Aggregated single-process server: the engine (`engine.backend`) + LocalEngineClient +
    serve."""
    client, processor = make_local_client(config)
    asyncio.run(serve(config, client, processor, shutdown=shutdown, on_ready=on_ready))


def make_local_client(config: Config):
    from mmhpc.engine.interface import make_engine
    from mmhpc.server.engine_client import LocalEngineClient
    engine = make_engine(config, "aggregated")
    return LocalEngineClient(engine), engine.processor


class ServerThread:
    """A real server on 127.0.0.1 in a background thread (tests, benchmarks)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.client, self.processor = make_local_client(config)
        self.url: Optional[str] = None
        self.app = build_app(config, self.client, self.processor)
        self.frontend = frontend(self.app)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._main, name="mmhpc-frontend", daemon=True)

    def _main(self) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(url: str) -> None:
                self.url = url
                self._ready.set()
            await serve(self.config, self.client, self.processor, shutdown=self._stop,
                        on_ready=ready, app=self.app)
        try:
            asyncio.run(run())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()

    def start(self, timeout: float = 120.0) -> str:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"server did not start: {self._error!r}")
        return self.url

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

"""The OpenAI frontend end to end: real engine (tiny LLaVA), real HTTP on 127.0.0.1, the
`openai` client. Greedy text over HTTP must equal `mmhpc.LLM` offline for the same inputs."""
from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch

import json
import socket

from imgserver import ImageServer, http, stream_lines
from mmhpc import LLM, SamplingParams
from mmhpc.config import Config
from mmhpc.engine.sequence import MMItem
from mmhpc.server.app import ServerThread

MAX_LEN = 4096
QUESTION = "What is in this picture?"


def png_bytes(img, fmt="PNG") -> bytes:
    b = io.BytesIO()
    img.save(b, fmt)
    return b.getvalue()


def config(path, media: dict) -> Config:
    return Config.from_dict({"model": {"path": str(path), "max_model_len": MAX_LEN},
                             "cache": {"num_blocks": 256},
                             "server": {"host": "127.0.0.1", "port": 0},
                             "media": media})


@pytest.fixture(scope="module")
def env(tiny_llava, rng_image, tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    img = rng_image(1, 40, 30)
    img2 = rng_image(2, 24, 24)
    (root / "cat.png").write_bytes(png_bytes(img))
    from mmhpc.server.media import text_hidden_size
    hidden = text_hidden_size(tiny_llava)
    emb = torch.randn(6, hidden, generator=torch.Generator().manual_seed(0))
    torch.save({"mm_embeddings": emb, "note": torch.tensor([1])}, root / "emb.pt")
    from safetensors.torch import save_file
    save_file({"mm_embeddings": emb}, str(root / "emb.safetensors"))
    srv = ImageServer().start()
    srv.add("/cat.png", png_bytes(img), content_type="image/png")
    srv.add("/dog.jpg", png_bytes(img2, "JPEG"), content_type="image/jpeg")
    srv.add("/emb.safetensors", (root / "emb.safetensors").read_bytes())
    st = ServerThread(config(tiny_llava, {"allow_private_urls": True,
                                          "allowed_local_path": str(root)}))
    url = st.start()
    llm = LLM(str(tiny_llava), max_model_len=MAX_LEN)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    from PIL import Image
    env = dict(url=url, st=st, srv=srv, root=root, llm=llm, client=client, model=tiny_llava.name,
               img=img, img2=Image.open(io.BytesIO(png_bytes(img2, "JPEG"))).convert("RGB"),
               emb=emb)
    yield env
    st.stop()
    srv.stop()


def chat(env, parts, stream=False, **kw):
    msgs = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, *parts]}]
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return env["client"].chat.completions.create(model=env["model"], messages=msgs,
                                                 stream=stream, **kw)


def offline(env, images, max_tokens=12, **kw):
    parts = [{"type": "text", "text": QUESTION}] + [{"type": "image", "image": im} for im in images]
    return env["llm"].generate([{"role": "user", "content": parts}],
                               SamplingParams(max_tokens=max_tokens, **kw))[0]


def streamed(stream) -> tuple[str, object, str]:
    text, usage, reason = [], None, None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            text.append(c.delta.content or "")
            reason = c.finish_reason or reason
    return "".join(text), usage, reason


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def wait_idle(st, timeout=30.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        s = st.client.stats()
        if s["num_running"] == 0 and s["num_waiting"] == 0 and \
                s["num_free_blocks"] == s["num_total_blocks"]:
            return s
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {st.client.stats()}")


def test_models_health_metrics(env):
    import openai
    assert [m.id for m in env["client"].models.list().data] == [env["model"]]
    assert env["client"].models.retrieve(env["model"]).id == env["model"]
    with pytest.raises(openai.NotFoundError):
        env["client"].models.retrieve("gpt-17")
    assert http("GET", env["url"] + "/health")[0] == 200
    text = http("GET", env["url"] + "/metrics")[1].decode()
    for name in ("mmhpc_requests_total", "mmhpc_request_latency_seconds_bucket",
                 "mmhpc_queue_depth", "mmhpc_num_free_blocks", "mmhpc_generation_tokens_total"):
        assert name in text


def test_tokenize_and_detokenize(env):
    """/tokenize counts what a request would send the engine (a chat's image placeholders
    included: the usage of the same chat), /detokenize gives the text back; bad input: 400."""
    import json
    url = env["url"]
    part = [image_part(env["srv"].url("/cat.png"))]
    msgs = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, *part]}]
    status, raw = http("POST", url + "/tokenize", json.dumps({"messages": msgs}).encode())
    assert status == 200, raw
    tok = json.loads(raw)
    r = chat(env, part, max_tokens=2)
    assert tok["count"] == len(tok["tokens"]) == r.usage.prompt_tokens
    assert tok["max_model_len"] == MAX_LEN
    status, raw = http("POST", url + "/tokenize", json.dumps({"prompt": "hello there"}).encode())
    ids = json.loads(raw)["tokens"]
    assert status == 200 and ids == env["llm"].engine.processor.process("hello there", [])[0]
    status, raw = http("POST", url + "/detokenize", json.dumps({"tokens": ids}).encode())
    assert status == 200 and "hello there" in json.loads(raw)["prompt"]
    for path, body in (("/tokenize", {"prompt": 5}), ("/detokenize", {"tokens": [-1]}),
                       ("/detokenize", {"tokens": "abc"}), ("/tokenize", {"messages": "x"})):
        status, raw = http("POST", url + path, json.dumps(body).encode())
        assert status == 400 and json.loads(raw)["error"]["param"], (path, raw)


def _metric(env, name: str) -> float:
    text = http("GET", env["url"] + "/metrics")[1].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_cached_tokens_reported_streamed_and_counted(env):
    """A repeated prompt's prefix-cache hit shows in the streamed usage (as in the
    non-streamed one) and in /metrics, for chat and completions alike."""
    part = [image_part(env["srv"].url("/cat.png"))]
    streamed(chat(env, part, max_tokens=2, stream=True))          # read to its end
    before = _metric(env, "mmhpc_prompt_cached_tokens_total")
    _, usage, _ = streamed(chat(env, part, max_tokens=2, stream=True,
                                stream_options={"include_usage": True}))
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached >= usage.prompt_tokens - 2 * 16 > 0
    assert _metric(env, "mmhpc_prompt_cached_tokens_total") - before == cached
    prompt = "a prompt for the completions endpoint, long enough to fill a few blocks " * 2
    env["client"].completions.create(model=env["model"], prompt=prompt, max_tokens=2)
    before = _metric(env, "mmhpc_prompt_cached_tokens_total")
    env["client"].completions.create(model=env["model"], prompt=prompt, max_tokens=2)
    assert _metric(env, "mmhpc_prompt_cached_tokens_total") - before >= 16


def test_chat_image_url_matches_offline(env):
    ref = offline(env, [env["img"]])
    r = chat(env, [image_part(env["srv"].url("/cat.png"))])
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    ids, _ = env["st"].processor.process(
        env["st"].processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]}]),
        [env["img"]])
    assert r.usage.prompt_tokens == len(ids) > 20          # image tokens counted
    assert r.usage.completion_tokens == len(ref.token_ids)
    text, usage, reason = streamed(chat(env, [image_part(env["srv"].url("/cat.png"))], stream=True,
                                        stream_options={"include_usage": True}))
    assert text == ref.text and reason == ref.finish_reason
    assert usage.prompt_tokens == len(ids) and usage.completion_tokens == len(ref.token_ids)


@pytest.mark.parametrize("source", ["data", "file", "path", "jpeg_http", "emb_pt", "emb_st_http",
                                    "mixed"])
def test_chat_sources_match_offline(env, source):
    root, srv = env["root"], env["srv"]
    data = "data:image/png;base64," + base64.b64encode((root / "cat.png").read_bytes()).decode()
    parts, images = {
        "data": ([image_part(data)], [env["img"]]),
        "file": ([image_part(f"file://{root}/cat.png")], [env["img"]]),
        "path": ([image_part("cat.png")], [env["img"]]),
        "jpeg_http": ([image_part(srv.url("/dog.jpg"))], [env["img2"]]),
        "emb_pt": ([image_part(str(root / "emb.pt"))], [env["emb"]]),
        "emb_st_http": ([image_part(srv.url("/emb.safetensors"))], [env["emb"]]),
        "mixed": ([image_part(srv.url("/cat.png")), image_part(str(root / "emb.pt"))],
                  [env["img"], env["emb"]]),
    }[source]
    ref = offline(env, images)
    assert chat(env, parts).choices[0].message.content == ref.text
    text, _, _ = streamed(chat(env, parts, stream=True))
    assert text == ref.text


def test_completions_match_offline(env):
    prompt = "The picture shows a red"
    ref = env["llm"].generate(prompt, SamplingParams(max_tokens=10))[0]
    c = env["client"].completions
    r = c.create(model=env["model"], prompt=prompt, max_tokens=10, temperature=0, logprobs=2)
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ref.token_ids) and all(len(t) <= 2 for t in lp.top_logprobs)
    s = c.create(model=env["model"], prompt=prompt, max_tokens=10, temperature=0, stream=True,
                 stream_options={"include_usage": True})
    chunks = list(s)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_sampling_options(env):
    part = [image_part(env["srv"].url("/cat.png"))]
    kw = dict(n=3, temperature=0.9, top_p=0.9, top_k=20, seed=7, max_tokens=8, ignore_eos=True)
    a = chat(env, part, extra_body={"top_k": 20, "ignore_eos": True},
             **{k: v for k, v in kw.items() if k not in ("top_k", "ignore_eos")})
    b = chat(env, part, extra_body={"top_k": 20, "ignore_eos": True},
             **{k: v for k, v in kw.items() if k not in ("top_k", "ignore_eos")})
    ta = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and ta == [c.message.content for c in b.choices]
    assert len(set(ta)) > 1                           # seeds derive per choice
    assert a.usage.completion_tokens == 24
    ref = offline(env, [env["img"]], max_tokens=30)
    stop = ref.text[len(ref.text) // 2: len(ref.text) // 2 + 2]
    if stop.strip():
        r = chat(env, part, max_tokens=30, stop=[stop])
        assert stop not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    # stop_token_ids (vLLM's): the reference's 4th token ends it, included like an EOS would be
    ids = ref.token_ids[:4]
    cut = ids.index(ids[3]) + 1
    r = chat(env, part, max_tokens=30, temperature=0, extra_body={"stop_token_ids": [ids[3]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == cut
    r = chat(env, part, logprobs=True, top_logprobs=3, max_completion_tokens=5,
             extra_body={"min_tokens": 5})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert all(len(t.top_logprobs) == 3 for t in content)


def long_chat(env, **kw) -> dict:
    """A greedy chat request that runs 4000 tokens unless its client leaves."""
    return {"model": env["model"], "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 4000, "ignore_eos": True, "temperature": 0, **kw}


def test_stream_disconnect_aborts(env):
    st, fe = env["st"], env["st"].frontend
    wait_idle(st)
    before = fe.metrics.generation_tokens
    in_flight = []                  # seen while connected: after the close it may be aborted
    lines = stream_lines(env["url"] + "/v1/chat/completions", long_chat(env, stream=True), 4,
                         before_close=lambda: in_flight.append(fe.in_flight))
    assert len(lines) == 4 and in_flight == [1]
    wait_idle(st, timeout=20)
    assert fe.metrics.generation_tokens - before < 4000


def test_nonstream_disconnect_aborts(env):
    st, fe = env["st"], env["st"].frontend
    wait_idle(st)
    aborted = fe.metrics.aborted
    with pytest.raises(socket.timeout):
        http("POST", env["url"] + "/v1/chat/completions", long_chat(env), timeout=0.7)
    wait_idle(st, timeout=20)
    assert fe.metrics.aborted == aborted + 1


def test_engine_error_fails_one_request_only(env):
    """A request that breaks the engine's step (bad pixel values handed straight to the
    EngineClient) gets an error; a concurrent good stream finishes with the right text."""
    st = env["st"]
    ref = offline(env, [env["img"]], max_tokens=40, ignore_eos=True)
    result = {}

    def good():
        result["text"] = streamed(chat(env, [image_part(env["srv"].url("/cat.png"))], stream=True,
                                       max_tokens=40, extra_body={"ignore_eos": True}))[0]
    t = threading.Thread(target=good)
    t.start()
    while st.client.stats()["num_running"] == 0 and t.is_alive():
        time.sleep(0.005)
    n = st.processor.num_image_tokens(8, 8)
    ids = [1] * 3 + [st.processor.image_token_id] * n + [2]
    bad = MMItem(content_hash="x" * 64, offset=3, num_tokens=n, pixel_values="not pixels")

    async def run_bad():
        outs = [o async for o in st.client.generate("bad-1", ids, SamplingParams(max_tokens=4),
                                                     [bad])]
        return outs[-1]
    last = asyncio.run_coroutine_threadsafe(run_bad(), st._loop).result(30)
    t.join(60)
    assert last.finished and last.finish_reason == "error" and last.error
    assert result["text"] == ref.text
    assert st.client.healthy()
    wait_idle(st)
    assert chat(env, [image_part(env["srv"].url("/cat.png"))]).choices[0].message.content == \
        offline(env, [env["img"]]).text


def test_health_503_when_engine_not_running(env):
    from aiohttp.test_utils import TestClient, TestServer
    from mmhpc.server.app import build_app, frontend
    from mmhpc.server.engine_client import LocalEngineClient

    async def run():
        app = build_app(env["st"].config, LocalEngineClient(env["st"].client.engine),
                        env["st"].processor)
        async with TestClient(TestServer(app)) as c:
            r1 = await c.get("/health")
            frontend(app).ready = True
            r2 = await c.get("/health")
            return r1.status, r2.status, (await r2.json())["error"]["code"]
    assert asyncio.run(run()) == (503, 503, "unhealthy")


def test_sigterm_drains_and_exits_zero(tiny_llava):
    code = ("from mmhpc.config import Config; from mmhpc.server.app import run_local; "
            f"run_local(Config.from_dict({{'model': {{'path': {str(tiny_llava)!r}, "
            "'max_model_len': 512}, 'server': {'host': '127.0.0.1', 'port': 0}}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("mmhpc ready: http://127.0.0.1:"), line
        url = line.split()[-1]
        out = {}

        def request():
            out["r"] = http("POST", url + "/v1/completions", {
                "prompt": "The cat", "max_tokens": 200, "ignore_eos": True, "temperature": 0})
        t = threading.Thread(target=request)
        t.start()
        for _ in range(400):
            if b"mmhpc_requests_in_flight 1" in http("GET", url + "/metrics")[1]:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert out["r"][0] == 200
        assert json.loads(out["r"][1])["usage"]["completion_tokens"] == 200
        assert proc.wait(30) == 0
    finally:
        proc.kill()

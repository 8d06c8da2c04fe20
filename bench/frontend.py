"""Frontend benchmark: what the HTTP layer sustains and adds, with the tiny model on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python bench/frontend.py [--family llava] [--requests 200]

Runs the server (`mmhpc.server.app.run_local`) in a subprocess and drives it with an aiohttp
client from this process; the direct baseline runs an LLMEngine in this process on the same
token ids. Reports:
- latency added per request: median HTTP round trip (chat, max_tokens=1) minus the median of
  the same request straight into the engine (processor + add_request + step loop);
- requests/s with many concurrent 1-token requests (frontend-bound);
- streamed tokens/s (SSE) with concurrent streams, next to the engine's own tokens/s.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _png() -> bytes:
    import numpy as np
    from PIL import Image
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(b, "PNG")
    return b.getvalue()


def start_server(path: str, max_len: int) -> tuple[subprocess.Popen, str]:
    code = ("from mmhpc.config import Config; from mmhpc.server.app import run_local; "
            f"run_local(Config.from_dict({{'model': {{'path': {path!r}, 'max_model_len': {max_len}}}, "
            "'server': {'host': '127.0.0.1', 'port': 0, 'max_concurrent_requests': 4096}}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("mmhpc ready: "):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.split()[-1]


def chat_body(image: str | None, max_tokens: int, stream: bool = False) -> dict:
    content: list = [{"type": "text", "text": "Describe the picture."}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}


async def http_latency(session, url: str, body: dict, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            await r.read()
        out.append(time.perf_counter() - t)
    return out


async def http_rps(session, url: str, body: dict, total: int, conc: int) -> float:
    sem = asyncio.Semaphore(conc)

    async def one():
        async with sem, session.post(url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            await r.read()
    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    return total / (time.perf_counter() - t)


async def http_stream_tps(session, url: str, body: dict, conc: int) -> float:
    async def one() -> int:
        n = 0
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: {") and b'"usage"' in line:
                    n += json.loads(line[6:])["usage"]["completion_tokens"]
        return n
    t = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(conc)))
    return sum(counts) / (time.perf_counter() - t), sum(counts)


def direct(path: str, max_len: int, image: bytes | None, n_lat: int, conc: int, stream_tokens: int):
    from PIL import Image
    from mmhpc.config import Config
    from mmhpc.engine.engine import LLMEngine
    from mmhpc.engine.sequence import SamplingParams
    engine = LLMEngine(Config.from_dict({"model": {"path": path, "max_model_len": max_len}}))
    proc = engine.processor
    content = [{"type": "text", "text": "Describe the picture."}] + ([{"type": "image"}] if image else [])
    rid = iter(range(10**9))

    def run(k: int, max_tokens: int) -> None:
        for _ in range(k):
            images = [Image.open(io.BytesIO(image)).convert("RGB")] if image else []
            ids, items = proc.process(proc.apply_chat_template([{"role": "user", "content": content}]), images)
            engine.add_request(f"d{next(rid)}", ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                               items)
        while engine.has_unfinished_requests():
            engine.step()
    run(2, 1)
    lat = []
    for _ in range(n_lat):
        t = time.perf_counter()
        run(1, 1)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    run(conc, stream_tokens)
    tps = conc * stream_tokens / (time.perf_counter() - t)
    return lat, tps


async def bench(url: str, image: str | None, args) -> dict:
    import aiohttp
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:
        await http_latency(s, url, chat_body(image, 1), 3)
        lat = await http_latency(s, url, chat_body(image, 1), args.latency_requests)
        rps = await http_rps(s, url, chat_body(image, 1), args.requests, args.concurrency)
        tps, ntok = await http_stream_tps(s, url, chat_body(image, args.stream_tokens, True),
                                          args.streams)
    return {"lat": lat, "rps": rps, "tps": tps, "ntok": ntok}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="llava")
    ap.add_argument("--latency-requests", type=int, default=40)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--stream-tokens", type=int, default=64)
    args = ap.parse_args()
    from mmhpc.tools.tiny import tiny_checkpoint
    path = str(tiny_checkpoint(args.family))
    max_len = 512
    png = _png()
    proc, url = start_server(path, max_len)
    try:
        rows = {}
        for name, img in (("text", None), ("image", "data:image/png;base64," + base64.b64encode(png).decode())):
            rows[name] = asyncio.run(bench(url, img, args))
    finally:
        proc.terminate()
        proc.wait(60)
    for name, img in (("text", None), ("image", png)):
        lat, tps = direct(path, max_len, img, args.latency_requests, args.streams, args.stream_tokens)
        rows[name]["direct_lat"], rows[name]["direct_tps"] = lat, tps
    print(f"model: tiny {args.family} ({path}), cpu cores: {os.cpu_count()}")
    print("| input | HTTP p50 ms | direct p50 ms | added p50 ms | req/s (c=%d, 1 tok) | "
          "stream tok/s (%d streams x %d) | engine tok/s |" % (args.concurrency, args.streams,
                                                              args.stream_tokens))
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        h, d = statistics.median(r["lat"]) * 1e3, statistics.median(r["direct_lat"]) * 1e3
        print(f"| {name} | {h:.1f} | {d:.1f} | {h - d:.1f} | {r['rps']:.1f} | {r['tps']:.0f} | "
              f"{r['direct_tps']:.0f} |")


if __name__ == "__main__":
    main()

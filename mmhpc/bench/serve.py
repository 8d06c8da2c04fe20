"""`python -m mmhpc.bench serve`: an OpenAI-API streaming client at a fixed request rate
(Poisson arrivals) or a fixed concurrency, reporting vLLM `bench serve` metrics by the same
definitions:

- TTFT: request sent → first content token; TPOT: (E2EL − TTFT) / (output tokens − 1), per
  request with > 1 output token; ITL: every gap between consecutive streamed chunks; E2EL:
  request sent → last byte. Each: mean, median, std and the asked percentiles (ms).
- request/s = completed / duration; output tokens/s = Σ output tokens / duration (tokens from
  the server's `usage` when it sends it, else one per content chunk); total tokens/s adds
  prompt tokens; goodput = completed requests meeting every given SLO / duration.

Threads, one per in-flight request, with http.client (no extra dependency)."""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class RequestResult:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""
    start: float = 0.0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--endpoint", default="/v1/chat/completions")
    p.add_argument("--num-prompts", type=int, default=32)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rate", type=float, default=float("inf"), help="requests/s (Poisson)")
    g.add_argument("--concurrency", type=int, default=None, help="requests in flight")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap with --rate")
    p.add_argument("--input-len", type=int, default=40, help="words of text per prompt")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--image-size", default=None, help="WxH: one random PNG per image")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--percentiles", default="50,90,99")
    p.add_argument("--goodput", nargs="*", default=[],
                   help="SLOs in ms, e.g. ttft:500 tpot:50 e2el:5000")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")


def _conn(url):
    u = urllib.parse.urlsplit(url)
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    return cls, u.hostname, u.port, u.path.rstrip("/")


def _png_data_url(rng, w: int, h: int) -> str:
    from PIL import Image
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    b = io.BytesIO()
    img.save(b, "PNG")
    return "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()


def make_payloads(args, model: str) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    words = ["the", "a", "image", "shows", "what", "is", "in", "this", "picture", "describe",
             "color", "shape", "left", "right", "many", "small", "large", "scene"]
    out = []
    for _ in range(args.num_prompts):
        text = " ".join(rng.choice(words, args.input_len))
        content = [{"type": "text", "text": text}]
        if args.image_size:
            w, _, h = args.image_size.lower().partition("x")
            for _ in range(args.images_per_request):
                content.append({"type": "image_url", "image_url": {
                    "url": _png_data_url(rng, int(w), int(h or w))}})
        body = {"model": model, "messages": [{"role": "user", "content": content}],
                "max_tokens": args.output_len, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        if args.endpoint.endswith("/completions") and "chat" not in args.endpoint:
            body.pop("messages")
            body["prompt"] = text
        out.append(body)
    return out


def send(url: str, endpoint: str, body: dict, timeout: float) -> RequestResult:
    cls, host, port, base = _conn(url)
    res = RequestResult()
    res.start = t0 = time.perf_counter()
    try:
        conn = cls(host, port, timeout=timeout)
        conn.request("POST", base + endpoint, json.dumps(body),
                     {"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return res
        last = None
        chunks = 0
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            msg = json.loads(data)
            if msg.get("usage"):
                res.output_tokens = msg["usage"].get("completion_tokens", 0)
                res.prompt_tokens = msg["usage"].get("prompt_tokens", 0)
            text = "".join((c.get("delta", {}) or {}).get("content") or c.get("text") or ""
                           for c in msg.get("choices", []))
            if not text:
                continue
            now = time.perf_counter()
            if last is None:
                res.ttft = now - t0
            else:
                res.itl.append(now - last)
            last = now
            chunks += 1
        res.latency = time.perf_counter() - t0
        res.output_tokens = res.output_tokens or chunks
        res.ok = last is not None
        if not res.ok:
            res.error = "no content"
        conn.close()
    except Exception as e:   # noqa: BLE001 - a failed request is a result
        res.error = f"{type(e).__name__}: {e}"
    return res


def _stats(values_s: list[float], percentiles: list[float]) -> dict:
    a = np.asarray(values_s, dtype=float) * 1000.0 if values_s else np.zeros(1)
    d = {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std())}
    for p in percentiles:
        d[f"p{p:g}"] = float(np.percentile(a, p))
    return {k: round(v, 3) for k, v in d.items()}


def metrics(results: list[RequestResult], duration: float, percentiles: list[float],
            slos: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    good = 0
    for r in ok:
        tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        vals = {"ttft": r.ttft, "tpot": tpot, "e2el": r.latency}
        if all(vals[k] * 1000.0 <= v for k, v in slos.items()):
            good += 1
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    m = dict(completed=len(ok), failed=len(results) - len(ok), duration_s=round(duration, 3),
             total_input_tokens=in_tokens, total_output_tokens=out_tokens,
             request_throughput=round(len(ok) / duration, 3),
             output_throughput=round(out_tokens / duration, 2),
             total_token_throughput=round((in_tokens + out_tokens) / duration, 2),
             ttft_ms=_stats([r.ttft for r in ok], percentiles),
             tpot_ms=_stats(tpots, percentiles),
             itl_ms=_stats([x for r in ok for x in r.itl], percentiles),
             e2el_ms=_stats([r.latency for r in ok], percentiles))
    if slos:
        m["goodput"] = round(good / duration, 3)
        m["slos_ms"] = slos
    errors = sorted({r.error for r in results if r.error})
    if errors:
        m["errors"] = errors[:5]
    return m


def _server_model(url: str) -> str:
    cls, host, port, base = _conn(url)
    conn = cls(host, port, timeout=30)
    conn.request("GET", base + "/v1/models")
    data = json.loads(conn.getresponse().read())
    return data["data"][0]["id"]


def run(args) -> dict:
    model = args.model or _server_model(args.url)
    payloads = make_payloads(args, model)
    results: list[RequestResult | None] = [None] * len(payloads)
    limit = args.concurrency or args.max_concurrency
    sem = threading.Semaphore(limit) if limit else None
    rng = random.Random(args.seed)

    def worker(i: int) -> None:
        try:
            results[i] = send(args.url, args.endpoint, payloads[i], args.timeout)
        finally:
            if sem:
                sem.release()

    threads = []
    t0 = time.perf_counter()
    for i in range(len(payloads)):
        if sem:
            sem.acquire()
        th = threading.Thread(target=worker, args=(i,), daemon=True)
        th.start()
        threads.append(th)
        if args.concurrency is None and args.rate != float("inf") and i + 1 < len(payloads):
            time.sleep(rng.expovariate(args.rate))
    for th in threads:
        th.join()
    duration = time.perf_counter() - t0
    pcts = [float(p) for p in args.percentiles.split(",") if p]
    slos = {k: float(v) for k, v in (s.split(":") for s in args.goodput)}
    out = dict(url=args.url, model=model, num_prompts=len(payloads),
               request_rate=None if args.rate == float("inf") else args.rate,
               concurrency=args.concurrency, max_concurrency=args.max_concurrency,
               date=time.strftime("%Y-%m-%d %H:%M:%S"),
               **metrics([r for r in results if r is not None], duration, pcts, slos))
    out["per_request"] = [dict(ok=r.ok, start_s=round(r.start - t0, 4), ttft_s=round(r.ttft, 4),
                               e2el_s=round(r.latency, 4), output_tokens=r.output_tokens)
                          for r in results if r is not None]
    summary = {k: v for k, v in out.items() if k != "per_request"}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        from mmhpc.bench.plot import plot_serve
        plot_serve(out, args.plot)
    return out

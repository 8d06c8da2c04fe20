"""Per-request overhead of E/P/D against agg (tiny model, CPU, sequential requests).

    .venv/bin/python bench/epd_overhead.py [--family llava] [--requests 10] [--append]

Starts each deployment once under mpirun, warms it up, then sends sequential streaming chat
requests (one image each, distinct images: no encode cache hits) and reports median TTFT and
E2E latency. `--append` adds the table to bench/RESULTS.md under "E/P/D overhead (issue 5)".
"""
from __future__ import annotations

import argparse
import base64
import datetime
import io
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_image  # noqa: E402
from mpi_helpers import Deployment  # noqa: E402

DEPLOYMENTS = [("agg", 1, ["deployment=agg"]), ("ep_d", 3, ["deployment=ep_d"]),
               ("e_p_d", 4, ["deployment=e_p_d"])]


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def measure(url: str, n: int, max_tokens: int, seed0: int) -> tuple[list[float], list[float]]:
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    ttft, e2e = [], []
    for i in range(n):
        parts = [{"type": "text", "text": "Describe the picture."},
                 {"type": "image_url", "image_url": {"url": _data_url(make_image(seed0 + i, 48, 48))}}]
        t0 = time.perf_counter()
        first = None
        for c in client.chat.completions.create(model=model, stream=True, temperature=0,
                                                max_tokens=max_tokens,
                                                messages=[{"role": "user", "content": parts}]):
            if first is None and c.choices and c.choices[0].delta.content:
                first = time.perf_counter() - t0
        e2e.append(time.perf_counter() - t0)
        ttft.append(first if first is not None else e2e[-1])
    return ttft, e2e


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="llava")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated deployment names (default: all)")
    args = ap.parse_args()
    rows = []
    only = set(filter(None, args.only.split(",")))
    for name, ranks, overrides in DEPLOYMENTS:
        if only and name not in only:
            continue
        dep = Deployment(ranks, [f"model=tiny_{args.family}", *overrides],
                         Path(f"/tmp/epd_overhead_{name}.log")).start()
        try:
            measure(dep.url, 2, args.max_tokens, 10_000)            # warm-up
            ttft, e2e = measure(dep.url, args.requests, args.max_tokens, 0)
        finally:
            dep.stop()
        rows.append((name, ranks, statistics.median(ttft) * 1e3, statistics.median(e2e) * 1e3))
        print(f"{name:6s} ranks={ranks} TTFT p50 {rows[-1][2]:.1f} ms  E2E p50 {rows[-1][3]:.1f} ms",
              flush=True)
    base = rows[0]
    table = ["| deployment | ranks | TTFT p50 (ms) | E2E p50 (ms) | TTFT overhead | E2E overhead |",
             "| --- | --- | --- | --- | --- | --- |"]
    table += [f"| {n} | {r} | {t:.1f} | {e:.1f} | {t - base[2]:+.1f} ms | {e - base[3]:+.1f} ms |"
              for n, r, t, e in rows]
    text = "\n".join(table)
    print(text)
    if args.append:
        cmd = " ".join(["bench/epd_overhead.py", *sys.argv[1:]])
        section = (f"\n## E/P/D overhead (issue 5)\n\nCommand: `OMP_NUM_THREADS=1 .venv/bin/python "
                   f"{cmd}`  \nMachine: {platform.node()} ({platform.processor() or platform.machine()}, "
                   f"CPU only, shared cores)  \nDate: {datetime.date.today()}  \nModel: tiny_"
                   f"{args.family}, {args.requests} sequential streaming requests, one 48x48 image "
                   f"each, max_tokens={args.max_tokens}\n\n{text}\n")
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(section)


if __name__ == "__main__":
    main()

"""GPU timing helpers of the benchmark scripts (bench/*.py on the GPU machine)."""
from __future__ import annotations

import statistics

import torch


def cuda_time(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median ms of fn() over iters, by CUDA events around each call."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def graph_time_ms(fns, replays: int = 20) -> float:
    """Median ms of one call, from a CUDA graph holding all `fns` in sequence (no launch gaps:
    what the kernels take back to back)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    ms = cuda_time(graph.replay, replays, warmup=0)
    del graph
    return ms / len(fns)


def gemv_read_tbps(n: int = 32768, k: int = 8192) -> float:
    """HBM read rate (TB/s) of one large bf16 GEMV over three rotating weights (no cache
    reuse), best of 3 (it varies on an H200): the unit of the decode floors."""
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    i = [0]

    def gemv():
        i[0] = (i[0] + 1) % 3
        torch.nn.functional.linear(x, ws[i[0]])
    ms = min(cuda_time(gemv, 50) for _ in range(3))
    del ws
    return n * k * 2 / ms / 1e9

"""Decode timing for the GPU benches (bench/*_gpu.py): an engine over a model's architecture
with random weights, the card's read / matmul ceilings, the weight-read floor of a decode
step, and `decode_b1`: one request's engine.step() wall with CUDA graphs, the graph replay's
GPU time, A/B variants of the decode kernels, a profile. The steps run on the CPU too (a
smoke run on a tiny checkpoint); ceilings, replays and profiles need CUDA.

Bench code: it reaches into the native engine (runner, scheduler, CUDA step runner) to time
its parts, which no role may do.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from mmhpc.bench.cuda_timing import cuda_time, gemv_read_tbps


def _sync() -> None:
    if torch.cuda.is_available():                   # CPU smoke runs
        torch.cuda.synchronize()


def ceilings() -> dict:
    """Streaming-read ceilings: one large GEMV (`gemv_read_TBps`, the floor's default), and
    the best of it, the LLaVA-7B layer GEMVs back to back over 13 GB and a sum over 4 GB
    (`read_ceiling_TBps`: what HBM gives a pure read). Plus the bf16 matmul rate."""
    F = torch.nn.functional
    reads = {"gemv_32768x8192": round(gemv_read_tbps(32768, 8192), 3)}
    shapes = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]   # qkv, o, gate_up, down
    layers = [[torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
              for _ in range(32)]
    xs = {kk: torch.randn(1, kk, device="cuda", dtype=torch.bfloat16) for kk in (4096, 11008)}
    nbytes = sum(w.numel() * 2 for ws_ in layers for w in ws_)

    def step():
        for ws_ in layers:
            for w in ws_:
                F.linear(xs[w.shape[1]], w)
    ms = cuda_time(step, 10)
    reads["gemv_llava_layers_13GB"] = round(nbytes / ms / 1e9, 3)
    del layers
    big = torch.randn(2 * 1024 ** 3, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time(lambda: big.sum(), 10)
    reads["sum_4GB"] = round(big.numel() * 2 / ms / 1e9, 3)
    del big
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time(lambda: a @ b, 20)
    out = {"read_TBps": reads, "gemv_read_TBps": reads["gemv_32768x8192"],
           "read_ceiling_TBps": max(reads.values()),
           "matmul_TFLOPs": round(2 * 8192 ** 3 / ms / 1e9, 1)}
    print(reads, "-> read ceiling", out["gemv_read_TBps"], "TB/s;", out["matmul_TFLOPs"],
          "TFLOP/s bf16 matmul", flush=True)
    return out


def floor_ms(gb: float, ceil: dict, strict: bool = False) -> float:
    """ms to read `gb` GB at the card's GEMV read rate (strict: its best read rate)."""
    tbps = ceil.get("read_ceiling_TBps" if strict else "gemv_read_TBps", 2.5)
    return round(gb * 1e9 / (tbps * 1e12) * 1e3, 3)


def llm_bytes(model) -> int:
    """Bytes a decode step reads: the language model's weights but the embedding, + lm_head."""
    lm = model.language_model
    n = sum(p.numel() * p.element_size() for name, p in lm.named_parameters()
            if not name.startswith("embed_tokens"))
    return n + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def build_engine(path, max_num_seqs=256, **kw):
    """The native engine over `path` (arch:<name>, tiny dir) with random weights."""
    from mmhpc.bench.offline import _StubProcessor
    from mmhpc.config import Config
    from mmhpc.engine.engine import LLMEngine
    cfg = Config.from_dict({"model": {"path": path, "random_weights": True,
                                      "dtype": kw.get("dtype", "bfloat16"),
                                      "max_model_len": kw.get("max_model_len", 4096)},
                            "scheduler": {"max_num_seqs": max_num_seqs,
                                          "max_num_batched_tokens": kw.get("tokens", 8192)},
                            "cache": kw.get("cache", {})})
    t = time.perf_counter()
    eng = LLMEngine(cfg, processor=_StubProcessor([2]))
    _sync()
    print(f"engine {path}: built + graphs captured in {time.perf_counter() - t:.1f} s", flush=True)
    return eng


def _phase_timers(eng, acc: dict):
    """Wrap scheduler.schedule / runner.execute / sampler to time them (ms) into acc; returns
    a function that undoes the wrapping."""
    undo = []

    def wrap(obj, attr, key):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc.setdefault(key, []).append((time.perf_counter() - t) * 1e3)
        setattr(obj, attr, timed)
        undo.append(lambda: delattr(obj, attr) if attr in vars(obj) else None)
    wrap(eng.scheduler, "schedule", "schedule")
    wrap(eng.runner, "execute", "execute")
    sampler = eng.sampler

    class _Timed:
        def __call__(self, *a, **k):
            t = time.perf_counter()
            try:
                return sampler(*a, **k)
            finally:
                acc.setdefault("sampler", []).append((time.perf_counter() - t) * 1e3)

        def __getattr__(self, name):
            return getattr(sampler, name)
    eng.sampler = _Timed()

    def restore():
        for u in undo:
            u()
        eng.sampler = sampler
    return restore


def decode_steps(eng, rid, prompt_len, steps, acc=None) -> float:
    """Median wall ms of `engine.step()` over `steps` decode steps of one request."""
    from mmhpc.engine.sequence import SamplingParams
    vocab = eng.runner.model.text_config.vocab_size
    ids = [1] + torch.randint(min(100, vocab // 2), min(20000, vocab), (prompt_len - 1,)).tolist()
    eng.add_request(rid, ids, SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    eng.step()                                          # prefill
    _sync()
    restore = _phase_timers(eng, acc) if acc is not None else None
    ts = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        ts.append((time.perf_counter() - t) * 1e3)
    if restore:
        restore()
    return statistics.median(ts[2:])


def replay_ms(cs, n: int, ctx: int, num_blocks: int, iters: int = 50) -> float:
    """GPU ms of one decode step of graph size n (all pieces), every row at context ctx."""
    b = cs.bufs[n]
    nb = ctx // cs.block_size + 1
    b.lens[:n] = ctx
    b.tables[:n, :nb] = torch.arange(n * nb, device="cuda", dtype=torch.int32).view(n, nb) \
        % num_blocks
    b.slots[:n] = -1
    ms = cuda_time(lambda: cs.replay(n), iters)
    b.lens.zero_()
    return round(ms, 3)


def _recapture(cs, sizes):
    """Capture the decode graphs of `sizes` again, with the current switches (the other sizes'
    graphs stay, and with them the shared pool)."""
    for n in sizes:
        cs.graphs.pop(n, None)
        cs.logits.pop(n, None)
    torch.cuda.synchronize()
    cs.capture(sizes)


def decode_b1(eng, key, prompt_len, steps=64, eager=True):
    """One request, prompt_len tokens (text), decode `steps` tokens: median ms per
    `engine.step()` (wall, graphs on; eager too), the host phases of a step (a second pass with
    timers), and the GPU time of the graph replay alone (CUDA events). A/B variants (env
    GEMV_AB, PDL_AB, TILES_AB = 0 to skip): cuBLAS GEMVs, no PDL, the SiLU-mul as its own
    kernel, the other card's GEMV tiles, one rotary program a token."""
    cs = eng.runner.cuda_steps
    res = {"graphs": round(decode_steps(eng, f"{key}-g", prompt_len, steps), 3)}
    hits = cs.ahead_hits
    cs.ahead_enabled = False
    res["graphs_no_ahead"] = round(decode_steps(eng, f"{key}-n", prompt_len, steps), 3)
    cs.ahead_enabled = True
    from mmhpc.kernels import fused, pdl

    def variant(name, tag, on, off):
        """res["graphs_<name>"] (wall) and res["graph_replay_gpu_<name>"] with the decode
        graph of one row captured after `on()`; `off()` restores, and the graph again."""
        on()
        _recapture(cs, [1])
        res[f"graphs_{name}"] = round(decode_steps(eng, f"{key}-{tag}", prompt_len, steps), 3)
        res[f"graph_replay_gpu_{name}"] = replay_ms(cs, 1, prompt_len, eng.runner.num_blocks)
        off()
        _recapture(cs, [1])

    def setter(obj, attr, value):
        return lambda: setattr(obj, attr, value)

    gemv = cs.decoder.gemv
    if os.environ.get("GEMV_AB", "1") == "1" and gemv:                 # cuBLAS instead
        variant("cublas", "c", setter(cs.decoder, "gemv", False), setter(cs.decoder, "gemv", True))
    if os.environ.get("PDL_AB", "1") == "1" and pdl.enabled():         # no PDL launches
        variant("no_pdl", "np", lambda: pdl.set_enabled(False), lambda: pdl.set_enabled(None))
    if gemv and cs.decoder.gemv_silu:                                  # SiLU-mul as its own kernel
        variant("silu_kernel", "s", setter(cs.decoder, "gemv_silu", False),
                setter(cs.decoder, "gemv_silu", True))
    if gemv and os.environ.get("TILES_AB", "1") == "1":                # the other card's tiles
        if fused.gemv_tiles(4096) == fused.H100_TILES:                 # an H100: the H200's
            variant("h200_tiles", "t", setter(fused, "_ON_H100", False),
                    setter(fused, "_ON_H100", None))
        else:
            variant("h100_tiles", "t", lambda: fused.set_gemv_tiles(fused.H100_TILES),
                    lambda: fused.set_gemv_tiles(None))
        split = fused.ROTARY_DECODE_HEADS                              # one program a token
        variant("rotary_one_program", "r", setter(fused, "ROTARY_DECODE_HEADS", None),
                setter(fused, "ROTARY_DECODE_HEADS", split))
    res["ahead_hits"] = hits
    acc: dict = {}
    res["phased_wall"] = round(decode_steps(eng, f"{key}-p", prompt_len, steps // 2, acc), 3)
    res["phases"] = {k: round(statistics.median(v[2:]), 3) for k, v in acc.items()}
    if eager:
        cs.use_graphs = False
        res["eager"] = round(decode_steps(eng, f"{key}-e", prompt_len, 16), 3)
        cs.use_graphs = True
    res["graph_replay_gpu"] = replay_ms(cs, 1, prompt_len, eng.runner.num_blocks)
    res["graph_pieces"] = len(cs.pieces)
    return res


def profile_decode(eng, key, out_dir, n=5):
    """A torch profile of n decode steps of one 601-token request: $out_dir/profile_<key>.txt."""
    from torch.profiler import ProfilerActivity, profile
    from mmhpc.engine.sequence import SamplingParams
    eng.add_request(key, [1] + list(range(100, 700)), SamplingParams(max_tokens=n + 3,
                                                                     ignore_eos=True))
    eng.step()
    eng.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        while eng.has_unfinished_requests():
            eng.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)
    with open(os.path.join(out_dir, f"profile_{key}.txt"), "w") as f:
        f.write(table)
    print(table[:6000])

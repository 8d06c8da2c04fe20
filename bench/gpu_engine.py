"""Issue 8 on one GPU, in one process: ceilings, correctness of the CUDA path, LLaVA-1.5-7B
decode vs its weight-read floor (graphs / eager, profile), CLIP batched vs HF, offline 256
requests vs HF generate, Qwen2-VL-7B ViT at ~1080p vs HF and its decode floor. Every part is
guarded: a failure prints its traceback and the rest still runs. Results: $OUT/gpu_engine.json."""
from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

from mmhpc.bench.cuda_timing import cuda_time, gemv_read_tbps

OUT = os.environ.get("OUT", "/tmp")
R: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
PARTS = sys.argv[1].split(",") if len(sys.argv) > 1 else None


def save():
    with open(os.path.join(OUT, "gpu_engine.json"), "w") as f:
        json.dump(R, f, indent=1, default=str)


PART_FNS: list = []


def part(name):
    def deco(fn):
        PART_FNS.append((name, fn))
        return fn
    return deco


def run_parts():
    for name, fn in PART_FNS:
        if PARTS and name not in PARTS:
            continue
        t = time.perf_counter()
        print(f"\n===== {name} =====", flush=True)
        try:
            fn()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            R.setdefault("errors", {})[name] = traceback.format_exc()[-1500:]
        finally:
            os.environ["MMHPC_FAST_PATH"] = os.environ["MMHPC_DECODE_AHEAD"] = "1"
            os.environ["MMHPC_VIT_SDPA"] = "auto"
        print(f"----- {name}: {time.perf_counter() - t:.1f} s", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        save()


@part("ceilings")
def _():
    """Streaming-read ceilings: one large GEMV (the issue's method: `floor_ms_weights`), and
    the best of it, the LLaVA-7B layer GEMVs back to back over 13 GB and a sum over 4 GB
    (`floor_ms_weights_strict`: what HBM gives a pure read). Plus the bf16 matmul rate."""
    F = torch.nn.functional
    reads = {"gemv_32768x8192": round(gemv_read_tbps(), 3)}
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
    R["read_TBps"] = reads
    R["gemv_read_TBps"] = reads["gemv_32768x8192"]         # the floor: one large GEMV
    R["read_ceiling_TBps"] = max(reads.values())            # the strict one
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time(lambda: a @ b, 20)
    R["matmul_TFLOPs"] = round(2 * 8192 ** 3 / ms / 1e9, 1)
    print(reads, "-> read ceiling", R["gemv_read_TBps"], "TB/s;", R["matmul_TFLOPs"],
          "TFLOP/s bf16 matmul")
    floor = float(os.environ.get("MIN_TFLOPS", "0"))
    if R["matmul_TFLOPs"] < floor:                 # a throttled / shared card: stop here
        save()
        print(f"matmul {R['matmul_TFLOPs']} < MIN_TFLOPS {floor}: this card is not healthy, "
              "stopping", flush=True)
        os._exit(3)


@part("correctness")
def _():
    from mmhpc.kernels.fused import quick_gelu_, rotary_
    from mmhpc.models.layers import apply_rotary
    T, H, D = 37, 12, 128
    x = torch.randn(T, H, D, device="cuda", dtype=torch.float64).float()
    ang = torch.randn(T, D // 2, device="cuda")
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    ref = apply_rotary(x.double(), cos.double(), sin.double())
    got = rotary_(x.clone(), cos, sin)
    R["rotary_rel_err"] = float((got.double() - ref).norm() / ref.norm())
    y = torch.randn(1000, 333, device="cuda")
    ref = y.double() * torch.sigmoid(1.702 * y.double())
    R["quick_gelu_rel_err"] = float((quick_gelu_(y.clone()).double() - ref).norm() / ref.norm())
    # the whole engine, tiny LLaVA / Qwen2-VL in float32: fast path (graphs, decode ahead) ==
    # fast path without decode ahead == plain torch path; requests of different lengths and
    # max_tokens, 4 seats for 6 requests (admissions mid-way: predictions dropped and taken)
    from mmhpc.bench.offline import tiny_engine_tokens
    for fam in ("llava", "qwen2_vl"):
        toks = {}
        for name, fast, ahead in (("torch", "0", "0"), ("fast", "1", "0"), ("ahead", "1", "1")):
            toks[name], stats = tiny_engine_tokens(
                fam, {"MMHPC_FAST_PATH": fast, "MMHPC_DECODE_AHEAD": ahead})
            if name == "ahead":
                R[f"tiny_{fam}_ahead_hits_misses"] = stats
        for name in ("fast", "ahead"):
            same = sum(a == b for a, b in zip(toks["torch"], toks[name]))
            R[f"tiny_{fam}_{name}_vs_torch_tokens_equal"] = f"{same}/{len(toks['torch'])}"
    print({k: v for k, v in R.items() if "err" in k or "equal" in k or "hits" in k})


def llm_bytes(model) -> int:
    lm = model.language_model
    n = sum(p.numel() * p.element_size() for name, p in lm.named_parameters()
            if not name.startswith("embed_tokens"))
    return n + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def build_engine(path, max_num_seqs=256, **kw):
    from mmhpc.bench.offline import _StubProcessor
    from mmhpc.config import Config
    from mmhpc.engine.engine import LLMEngine
    cfg = Config.from_dict({"model": {"path": path, "random_weights": True, "dtype": "bfloat16",
                                      "max_model_len": kw.get("max_model_len", 4096)},
                            "scheduler": {"max_num_seqs": max_num_seqs,
                                          "max_num_batched_tokens": kw.get("tokens", 8192)},
                            "cache": kw.get("cache", {})})
    t = time.perf_counter()
    eng = LLMEngine(cfg, processor=_StubProcessor([2]))
    torch.cuda.synchronize()
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


def _decode_steps(eng, rid, prompt_len, steps, acc=None) -> float:
    """Median wall ms of `engine.step()` over `steps` decode steps of one request."""
    from mmhpc.engine.sequence import SamplingParams
    ids = [1] + torch.randint(100, 20000, (prompt_len - 1,)).tolist()
    eng.add_request(rid, ids, SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    eng.step()                                          # prefill
    torch.cuda.synchronize()
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
    timers), and the GPU time of the graph replay alone (CUDA events)."""
    cs = eng.runner.cuda_steps
    res = {"graphs": round(_decode_steps(eng, f"{key}-g", prompt_len, steps), 3)}
    hits = cs.ahead_hits
    cs.ahead_enabled = False
    res["graphs_no_ahead"] = round(_decode_steps(eng, f"{key}-n", prompt_len, steps), 3)
    cs.ahead_enabled = True
    from mmhpc.kernels import fused, pdl

    def variant(name, tag, on, off):
        """res["graphs_<name>"] (wall) and res["graph_replay_gpu_<name>"] with the decode
        graph of one row captured after `on()`; `off()` restores, and the graph again."""
        on()
        _recapture(cs, [1])
        res[f"graphs_{name}"] = round(_decode_steps(eng, f"{key}-{tag}", prompt_len, steps), 3)
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
    res["phased_wall"] = round(_decode_steps(eng, f"{key}-p", prompt_len, steps // 2, acc), 3)
    res["phases"] = {k: round(statistics.median(v[2:]), 3) for k, v in acc.items()}
    if eager:
        cs.use_graphs = False
        res["eager"] = round(_decode_steps(eng, f"{key}-e", prompt_len, 16), 3)
        cs.use_graphs = True
    res["graph_replay_gpu"] = replay_ms(cs, 1, prompt_len, eng.runner.num_blocks)
    res["graph_pieces"] = len(cs.pieces)
    return res


def profile_decode(eng, key, n=5):
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
    with open(os.path.join(OUT, f"profile_{key}.txt"), "w") as f:
        f.write(table)
    print(table[:6000])


def clip_bench(eng):
    from mmhpc.engine.sequence import MMItem
    from transformers import AutoModel
    model = eng.runner.model
    res = {}
    for bs in (1, 32, 64):
        px = torch.randn(bs, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
        items = lambda: [MMItem("x", 0, 576, None, px[i:i + 1]) for i in range(bs)]  # noqa: E731
        for backend in ("cudnn", "flash", "auto"):
            os.environ["MMHPC_VIT_SDPA"] = backend
            ms = cuda_time(lambda: model.encode(items()), 10)
            res[f"mmhpc_{backend}_bs{bs}_ms_per_image"] = round(ms / bs, 4)
    os.environ["MMHPC_VIT_SDPA"] = "auto"
    with torch.device("cuda"):
        hf = AutoModel.from_config(model.config.vision_config, dtype=torch.bfloat16).eval()
    for bs in (1, 32, 64):
        px = torch.randn(bs, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            ms = cuda_time(lambda: hf(px, output_hidden_states=True), 10)
        res[f"hf_bs{bs}_ms_per_image"] = round(ms / bs, 4)
    del hf
    # FLOP floor of the 23 layers LLaVA reads: 577 tokens, hidden 1024, MLP 4096, 16 heads
    S, C, I, L = 577, 1024, 4096, 23
    flops = L * (2 * S * (4 * C * C + 2 * C * I) + 4 * S * S * C)
    res["flops_per_image_G"] = round(flops / 1e9, 1)
    res["flop_floor_ms_per_image"] = round(flops / (R.get("matmul_TFLOPs", 790) * 1e9), 4)
    return res


def clip_profile(model, name="profile_clip_bs64.txt") -> float:
    """CLIP batch 64: ms per image and a torch.profiler table of 3 batches."""
    from torch.profiler import ProfilerActivity, profile
    from mmhpc.engine.sequence import MMItem
    px = torch.randn(64, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    items = lambda: [MMItem("x", 0, 576, None, px[i:i + 1]) for i in range(64)]  # noqa: E731
    ms = cuda_time(lambda: model.encode(items()), 10) / 64
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            model.encode(items())
        torch.cuda.synchronize()
    t = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    open(os.path.join(OUT, name), "w").write(t)
    print(round(ms, 4), "ms/image CLIP b64\n", t[:5000], flush=True)
    return round(ms, 4)


def floor_ms(gb: float, strict: bool = False) -> float:
    tbps = R.get("read_ceiling_TBps" if strict else "gemv_read_TBps", 2.5)
    return round(gb * 1e9 / (tbps * 1e12) * 1e3, 3)


@part("llava")
def _():
    eng = build_engine("arch:llava-1.5-7b", 256)
    r = R.setdefault("llava", {})
    r["weights_read_GB"] = round(llm_bytes(eng.runner.model) / 1e9, 3)
    r["num_blocks"] = eng.runner.num_blocks
    r["floor_ms_weights"] = floor_ms(r["weights_read_GB"])
    r["floor_ms_weights_strict"] = floor_ms(r["weights_read_GB"], strict=True)
    for ctx in (616, 2000):
        d = decode_b1(eng, f"llava{ctx}", ctx, eager=ctx == 616)
        d["ratio_wall"] = round(d["graphs"] / r["floor_ms_weights"], 3)
        d["ratio_wall_strict"] = round(d["graphs"] / r["floor_ms_weights_strict"], 3)
        d["ratio_gpu"] = round(d["graph_replay_gpu"] / r["floor_ms_weights"], 3)
        r[f"decode_b1_ctx{ctx}_ms"] = d
        print(ctx, d, flush=True)
        save()
    cs = eng.runner.cuda_steps
    r["decode_step_ms_by_batch_ctx700"] = {
        bs: replay_ms(cs, bs, 700, eng.runner.num_blocks, 10) for bs in (16, 64, 128, 256)}
    print(r["decode_step_ms_by_batch_ctx700"], flush=True)
    profile_decode(eng, "llava_b1")
    save()
    r["clip"] = clip_bench(eng)
    r["clip"]["profiled_bs64_ms_per_image"] = clip_profile(eng.runner.model)
    print(r["clip"], flush=True)
    del eng


@part("exp")
def _():
    """A/B of this session's changes: decode graph pieces (layers per piece) at b=1, and
    attention variants for the Qwen2-VL ViT's head_dim 80."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from mmhpc.engine.cuda_graphs import graph_pieces
    r = R.setdefault("exp", {})
    N, H = 10764, 16
    att = {}
    q, k, v = (torch.randn(1, H, N, 80, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * N * N * H * 80
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for pad in (80, 96, 128):
            qq, kk, vv = (F.pad(t, (0, pad - 80)) for t in (q, k, v))
            try:
                with sdpa_kernel([backend]):
                    ms = cuda_time(lambda: F.scaled_dot_product_attention(
                        qq, kk, vv, scale=80 ** -0.5), 5, 1)
                att[f"{name}_d{pad}_ms"] = round(ms, 2)
                att[f"{name}_d{pad}_TFLOPs_useful"] = round(flops / ms / 1e9, 1)
            except Exception as e:  # noqa: BLE001
                att[f"{name}_d{pad}"] = str(e)[:120]
    r["vit_attention_N10764_H16"] = att
    print(att, flush=True)
    del q, k, v
    save()
    eng = build_engine("arch:llava-1.5-7b", 8)
    cs = eng.runner.cuda_steps
    fl = floor_ms(round(llm_bytes(eng.runner.model) / 1e9, 3))
    pieces = {"floor_ms": fl}
    for chunk in (8, 0, 4):
        cs.pieces = graph_pieces(cs.decoder.num_layers, chunk)
        cs.graphs.clear()                       # all sizes: their pool goes, a fresh one comes
        cs.logits.clear()
        cs.pool = None
        torch.cuda.synchronize()
        cs.capture([1])
        d = decode_b1(eng, f"p{chunk}", 616, eager=False)
        d["ratio_wall"] = round(d["graphs"] / fl, 3)
        pieces[f"chunk{chunk}" + ("_again" if f"chunk{chunk}" in pieces else "")] = d
        print(chunk, d, flush=True)
    r["llava_decode_b1_pieces"] = pieces
    save()
    r["clip_bs64_ms_per_image"] = clip_profile(eng.runner.model, "profile_clip_bs64_exp.txt")
    save()
    del eng


def trace_decode(eng, key, prompt_len, steps=6):
    """Chrome trace of `steps` b=1 decode steps ($OUT/trace_<key>.json) and the per-step
    timing phases of one more pass."""
    from torch.profiler import ProfilerActivity, profile
    from mmhpc.engine.sequence import SamplingParams
    ids = [1] + torch.randint(100, 20000, (prompt_len - 1,)).tolist()
    eng.add_request(key, ids, SamplingParams(max_tokens=steps + 4, ignore_eos=True))
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 with_stack=False) as prof:
        while eng.has_unfinished_requests():
            eng.step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(os.path.join(OUT, f"trace_{key}.json"))


@part("trace")
def _():
    r = R.setdefault("trace", {})
    for path, n, ctx, kw in (("arch:llava-1.5-7b", 8, 616, {}),
                             ("arch:qwen2-vl-7b", 64, 1000, {"max_model_len": 8192}),
                             ("arch:llava-1.5-7b", 256, 616, {})):
        eng = build_engine(path, n, **kw)
        key = f"{path[5:10]}_{n}"
        r[key] = decode_b1(eng, key, ctx, eager=False)
        print(key, r[key], flush=True)
        trace_decode(eng, key, ctx)
        save()
        del eng
        gc.collect()
        torch.cuda.empty_cache()


@part("prefill")
def _():
    """Where a prefill step's time goes: $PREFILL_TOKENS-token steps (default 16,384, the
    offline run's) of LLaVA-1.5-7B (prompts of 576 image + 41 text tokens each, embeddings
    given), wall per step and a kernel profile."""
    from torch.profiler import ProfilerActivity, profile
    from mmhpc.engine.sequence import MMItem, SamplingParams
    eng = build_engine("arch:llava-1.5-7b", 256,
                       tokens=int(os.environ.get("PREFILL_TOKENS", "16384")))
    r = R.setdefault("prefill", {})
    img = 32000
    hidden = eng.runner.model.text_config.hidden_size

    def add(n, tag):
        for i in range(n):
            it = MMItem(f"{tag}{i}", 1, 576, embeddings=torch.randn(
                576, hidden, device="cuda", dtype=torch.bfloat16) * 0.02)
            ids = [1] + [img] * 576 + torch.randint(100, 20000, (41,)).tolist()
            eng.add_request(f"{tag}{i}", ids, SamplingParams(max_tokens=1, ignore_eos=True),
                            mm_items=[it])
    add(40, "w")                                        # warm-up: Triton compiles, cuBLAS picks
    while eng.has_unfinished_requests():
        eng.step()
    add(52, "t")
    ts = []
    torch.cuda.synchronize()
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    r["step_ms"] = [round(x, 1) for x in ts]
    tokens = 52 * 618
    flops = 2 * 6.6e9 * tokens
    r["tokens"], r["TFLOPs_per_s"] = tokens, round(flops / (sum(ts) / 1e3) / 1e12, 1)
    print(r, flush=True)
    add(26, "p")
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        while eng.has_unfinished_requests():
            eng.step()
        torch.cuda.synchronize()
    t = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    open(os.path.join(OUT, "profile_prefill.txt"), "w").write(t)
    print(t[:6000], flush=True)
    del eng


@part("offline")
def _():
    from mmhpc.bench import offline
    import argparse
    p = argparse.ArgumentParser()
    offline.add_args(p)
    n_hf = int(os.environ.get("HF_MAX_REQUESTS", "128"))
    args = p.parse_args(["--model", "arch:llava-1.5-7b", "--random-weights", "--dtype",
                         "bfloat16", "--num-requests", "256", "--image-size", "336",
                         "--prompt-len", "40", "--output-len", "128",
                         "--max-num-seqs", os.environ.get("OFFLINE_MAX_SEQS", "256"),
                         "--preprocess", os.environ.get("PREPROCESS", "overlap"),
                         "--hf", "--hf-batch-sizes", os.environ.get("HF_BS", "64,128,256"),
                         "--hf-max-requests", str(n_hf),
                         "--json", os.path.join(OUT, "offline.json")])
    R["offline"] = offline.run(args)


@part("offline_ab")
def _():
    """mmhpc alone (no HF): $AB_VARIANTS, comma-separated "mode:ahead:seqs:tokens:extra" where
    extra joins with "+" CLI flags (--flag=value) and MMHPC_* environment settings."""
    from mmhpc.bench import offline
    import argparse
    res = R.setdefault("offline_ab", {})
    variants = [v.split(":") for v in os.environ.get("AB_VARIANTS", ",".join([
        "overlap:1:256:16384:", "first:1:256:16384:", "overlap:0:256:16384:",
        "overlap:1:128:16384:", "overlap:1:256:32768:"]))
        .split(",")]
    for mode, ahead, seqs, mnbt, extra in variants:
        os.environ["MMHPC_DECODE_AHEAD"] = ahead
        envs = dict(f.split("=", 1) for f in extra.split("+") if f.startswith("MMHPC_"))
        flags = [x for f in extra.split("+") if f and not f.startswith("MMHPC_")
                 for x in f.split("=", 1)]
        p = argparse.ArgumentParser()
        offline.add_args(p)
        args = p.parse_args(["--model", "arch:llava-1.5-7b", "--random-weights", "--dtype",
                             "bfloat16", "--num-requests", "256", "--image-size", "336",
                             "--prompt-len", "40", "--output-len", "128", "--max-num-seqs",
                             str(seqs), "--max-num-batched-tokens", str(mnbt),
                             "--preprocess", mode] + flags)
        from mmhpc.kernels import pdl
        pdl.set_enabled(envs["MMHPC_PDL"] != "0" if "MMHPC_PDL" in envs else None)
        with offline.env_set(envs):
            m = offline.run(args)["mmhpc"]
        pdl.set_enabled(None)
        key = f"{mode}_ahead{ahead}_seqs{seqs}_tokens{mnbt}{extra}"
        key += "_again" if key in res else ""
        res[key] = {k: m.get(k) for k in ("total_s", "steps", "output_tokens_per_s",
                                          "steps_by_kind", "gc")}
        print(key, res[key], flush=True)
        save()
    os.environ["MMHPC_DECODE_AHEAD"] = "1"


def _sweep(call, ref, axes, work, iters):
    """Time `call(**cfg)` over the product of `axes` [(tag, kwarg, values)]; rows keyed like
    "m64_n32_w4_st4": (us, work / ms, max |out - ref|), or the error text of a failed config."""
    import itertools
    rows = {}
    for combo in itertools.product(*(vals for _, _, vals in axes)):
        key = "_".join(f"{tag}{v}" for (tag, _, _), v in zip(axes, combo))
        cfg = {name: v for (_, name, _), v in zip(axes, combo)}
        f = lambda: call(**cfg)  # noqa: E731
        try:
            err = float((f().float() - ref.float()).abs().max())
            ms = cuda_time(f, iters)
        except Exception as e:  # noqa: BLE001
            rows[key] = str(e)[:80]
            continue
        rows[key] = (round(ms * 1e3, 1), round(work / ms, 3), err)
    return rows


@part("attn_tune")
def _():
    """The paged decode attention at the offline run's decode shape (LLaVA-7B: 32 heads x 128,
    block 16, batch 128 at context 681; pages shuffled over a 7,000-block pool): KV read rate
    of each (splits, block_n, warps, stages). (A dot-free variant, one program per row and
    head, read 2.65 TB/s here but made the 128-row decode graph slower, 22.01 vs 21.28 ms:
    not kept; bench/RESULTS.md.)"""
    from mmhpc.kernels.paged_attention import paged_decode_attention
    res = R.setdefault("attn_tune", {})
    H, D, bs, nblocks = 32, 128, 16, 7000
    kv = torch.randn(2, nblocks, H, bs, D, device="cuda", dtype=torch.bfloat16)
    for B, ctx in ((128, 681), (32, 681)):
        nb = -(-ctx // bs)
        tables = torch.randperm(nblocks, device="cuda")[:B * nb].view(B, nb).int()
        lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
        gb = B * ctx * H * D * 2 * 2 / 1e9
        ref = paged_decode_attention(q, kv, tables, lens, D ** -0.5, max_context_len=4096)
        rows = _sweep(lambda **cfg: paged_decode_attention(
            q, kv, tables, lens, D ** -0.5, max_context_len=4096, **cfg), ref,
            [("s", "num_splits", (1, 2)), ("n", "block_n", (32, 64, 128)),
             ("w", "num_warps", (4, 8)), ("st", "num_stages", (2, 3))], gb, 20)
        best = sorted(((k, v) for k, v in rows.items() if isinstance(v, tuple)),
                      key=lambda kv_: kv_[1][0])
        res[f"B{B}_ctx{ctx}"] = {"GB": round(gb, 3), "default": rows.get("s1_n64_w4_st2"),
                                 "best5": best[:5], "all": rows}
        print(B, ctx, "default", rows.get("s1_n64_w4_st2"), "best", best[:5], flush=True)
        save()


@part("decode128")
def _():
    """Kernel profile of the offline run's decode step: graph of 128 rows at context 681."""
    from torch.profiler import ProfilerActivity, profile
    eng = build_engine("arch:llava-1.5-7b", 128)
    cs = eng.runner.cuda_steps
    R["decode128_replay_ms"] = replay_ms(cs, 128, 681, eng.runner.num_blocks)
    b = cs.bufs[128]
    nb = 681 // cs.block_size + 1
    tables = torch.randperm(eng.runner.num_blocks, device="cuda")[:128 * nb].view(128, nb).int()

    def fill():
        b.lens[:128] = 681
        b.tables[:128, :nb] = tables
        b.slots[:128] = -1
    fill()
    R["decode128_replay_ms_shuffled"] = round(cuda_time(lambda: cs.replay(128), 20), 3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            cs.replay(128)
        torch.cuda.synchronize()
    b.lens.zero_()
    t = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25,
                                  max_name_column_width=90)
    open(os.path.join(OUT, "profile_decode128.txt"), "w").write(t)
    print(R["decode128_replay_ms"], R["decode128_replay_ms_shuffled"], t[:3000], flush=True)
    del eng


@part("offline_prof")
def _():
    """The offline run (mmhpc alone) under the profiler: GPU kernel time vs wall, per kind of
    step, preprocessing first and overlapped ($PROF_MODES). $PROF_OUTPUT_LEN=1 profiles the
    prefill steps alone."""
    from mmhpc.bench import offline
    import argparse
    out_len = os.environ.get("PROF_OUTPUT_LEN", "128")
    for mode in os.environ.get("PROF_MODES", "first,overlap").split(","):
        p = argparse.ArgumentParser()
        offline.add_args(p)
        args = p.parse_args(["--model", "arch:llava-1.5-7b", "--random-weights", "--dtype",
                             "bfloat16", "--num-requests", "256", "--image-size", "336",
                             "--prompt-len", "40", "--output-len", out_len, "--max-num-seqs",
                             "128", "--preprocess", mode, "--profile-dir",
                             os.path.join(OUT, f"offline_prof_{mode}_out{out_len}")])
        m = offline.run(args)["mmhpc"]
        R.setdefault("offline_prof", {})[mode] = m
        print(mode, json.dumps(m, indent=1)[:4000], flush=True)
        save()


@part("pattn_tune")
def _():
    """Prefill attention at the offline run's shape (a 16,384-token step: 26 fresh prompts of
    617 tokens, LLaVA-7B heads): the varlen kernel's (block_m, block_n, warps, stages), the
    previous kernel (every key from the paged cache; $PATTN_OLD names its file) at its
    default, and SDPA (flash, cuDNN) on the same q/k/v as a padded batch. Then a chunk after a
    cached prefix and a mixed step (decode rows + chunks) at the default config."""
    from mmhpc.kernels.paged_attention import paged_prefill_attention, write_kv
    F = torch.nn.functional
    res = R.setdefault("pattn_tune", {})
    H, D, bs, nblocks, B, L = 32, 128, 16, 7000, 26, 617
    T = B * L
    kv = torch.zeros(2, nblocks, H, bs, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    nb = -(-L // bs)
    tables = torch.randperm(nblocks, device="cuda")[:B * nb].view(B, nb).int()
    slots = (tables.long()[:, :, None] * bs + torch.arange(bs, device="cuda")).view(B, -1)[:, :L]
    write_kv(k, v, kv, slots.reshape(-1))
    cu = torch.arange(0, T + 1, L, device="cuda", dtype=torch.int32)
    lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
    tflop = 4 * B * (L * L / 2) * H * D / 1e12
    qb, kb, vb = (x.view(B, L, H, D).transpose(1, 2) for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qb.float(), kb.float(), vb.float(), is_causal=True)
    ref = ref.transpose(1, 2).reshape(T, H, D)
    rows = _sweep(lambda **cfg: paged_prefill_attention(
        q, k, v, cu, kv, tables, lens, D ** -0.5, max_seqlen_q=L, **cfg), ref,
        [("m", "block_m", (64, 128)), ("n", "block_n", (32, 64, 128)),
         ("w", "num_warps", (4, 8)), ("st", "num_stages", (2, 3, 4))], tflop * 1e3, 10)
    old = os.environ.get("PATTN_OLD")
    if old and os.path.exists(old):
        import importlib.util
        spec = importlib.util.spec_from_file_location("old_pattn", old)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        rows.update({f"old_{kk}": vv for kk, vv in _sweep(
            lambda **cfg: mod.paged_prefill_attention(
                q, k, v, cu, kv, tables, lens, D ** -0.5, max_seqlen_q=L, **cfg), ref,
            [("m", "block_m", (64,)), ("n", "block_n", (32,)), ("w", "num_warps", (4,)),
             ("st", "num_stages", (4,))], tflop * 1e3, 10).items()})
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        with sdpa_kernel([be]):
            f = lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)  # noqa: E731
            o = f().transpose(1, 2).reshape(T, H, D)
            ms = cuda_time(f, 10)
            rows[f"sdpa_{name}"] = (round(ms * 1e3, 1), round(tflop / ms * 1e3, 1),
                                    float((o.float() - ref.float()).abs().max()))
    best = sorted(((kk, vv) for kk, vv in rows.items() if isinstance(vv, tuple)),
                  key=lambda x: x[1][0])
    res.update({"TFLOP": round(tflop, 4), "default": rows.get("m64_n32_w4_st4"),
                "best8": best[:8], "all": rows})
    print("prefill attention default", rows.get("m64_n32_w4_st4"), "old",
          rows.get("old_m64_n32_w4_st4"), "best", best[:8], flush=True)


@part("gaps")
def _():
    """Where the GPU idles in prefill steps of the offline workload (real CLIP, 336 px images,
    preprocessing done beforehand): a trace of 4 steps, the engine's phases annotated; each GPU
    idle interval is attributed to the phases the host was in. (Replaces the earlier
    `offline_trace` part, whose table is results_issue8b/profile_prefill_cpu.txt.)"""
    from torch.profiler import ProfilerActivity, profile, record_function
    from mmhpc.bench.offline import ImageItems, build_prompt
    from mmhpc.bench.synthetic import make_requests
    from mmhpc.engine.sequence import SamplingParams
    from mmhpc.models import load_hf_config
    from mmhpc.models.arch import arch_dir
    tokens = int(os.environ.get("GAPS_TOKENS", "16384"))
    eng = build_engine("arch:llava-1.5-7b", 128, tokens=tokens)
    items = ImageItems(arch_dir("arch:llava-1.5-7b"), load_hf_config("arch:llava-1.5-7b"))
    reqs = make_requests(26 + 4 * (tokens // 600), [(336, 336)], 1, 40, 4, (100, 20000), 0,
                         (items.image_token_id,))
    prepped = [(r, [items(im) for im in r.images]) for r in reqs]

    def add(rs):
        for r, its in rs:
            eng.add_request(r.request_id, build_prompt(its, r.text_ids, items.image_token_id),
                            SamplingParams(max_tokens=2, ignore_eos=True), mm_items=its)
    add(prepped[:26])                                   # warm-up
    while eng.has_unfinished_requests():
        eng.step()
    add(prepped[26:])

    def annotate(obj, attr, name):
        fn = getattr(obj, attr)

        def wrapped(*a, **k):
            with record_function(name):
                return fn(*a, **k)
        setattr(obj, attr, wrapped)
    annotate(eng.scheduler, "schedule", "ph:schedule")
    annotate(eng.runner, "encode", "ph:encode")
    annotate(eng.runner, "execute", "ph:execute")
    annotate(eng.runner, "run_step", "ph:run_step")
    annotate(eng, "_postprocess", "ph:postprocess")
    sampler = eng.sampler

    class _S:
        def __call__(self, *a, **k):
            with record_function("ph:sampler"):
                return sampler(*a, **k)

        def __getattr__(self, n):
            return getattr(sampler, n)
    eng.sampler = _S()
    torch.cuda.synchronize()
    ts = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            t = time.perf_counter()
            with record_function("ph:step"):
                eng.step()
            ts.append(round((time.perf_counter() - t) * 1e3, 1))
        torch.cuda.synchronize()
    idle = _gpu_idle(prof)
    R["gaps"] = {"step_ms": ts, **idle}
    print(json.dumps(R["gaps"], indent=1)[:6000], flush=True)
    del eng


def _gpu_idle(prof, min_gap_us: float = 50) -> dict:
    """From a CPU + CUDA profile: GPU busy vs span, and each GPU idle interval over
    `min_gap_us` attributed to the "ph:" annotations and the host ops running during it."""
    path = "/tmp/trace_gaps.json"
    prof.export_chrome_trace(path)
    ev = json.load(open(path))["traceEvents"]
    os.remove(path)
    busy = sorted((e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("ph") == "X"
                  and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    merged = []
    for a, b in busy:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    gaps = [(merged[i][1], merged[i + 1][0]) for i in range(len(merged) - 1)
            if merged[i + 1][0] - merged[i][1] > min_gap_us]
    ann = [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("ph") == "X"
           and e.get("cat") == "user_annotation" and e["name"].startswith("ph:")]
    ops = [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("ph") == "X"
           and e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver")]

    def overlap(a, b, items_):
        out: dict = {}
        for name, s_, e_ in items_:
            o = min(b, e_) - max(a, s_)
            if o > 0:
                out[name] = out.get(name, 0) + o
        return out
    by_phase: dict = {}
    big = []
    for a, b in gaps:
        ph = overlap(a, b, ann)
        inner = {k: v for k, v in ph.items() if k not in ("ph:step",)}
        for k, v in (inner or {"(outside phases)": b - a}).items():
            by_phase[k] = by_phase.get(k, 0) + v
        big.append((round((b - a) / 1e3, 2), {k: round(v / 1e3, 2) for k, v in ph.items()},
                    sorted(((round(v / 1e3, 2), k) for k, v in overlap(a, b, ops).items()),
                           reverse=True)[:6]))
    busy_ms = sum(b - a for a, b in merged) / 1e3
    span_ms = (merged[-1][1] - merged[0][0]) / 1e3 if merged else 0
    return {"gpu_busy_ms": round(busy_ms, 1), "gpu_span_ms": round(span_ms, 1),
            "idle_ms_by_phase (nested phases overlap)": {k: round(v / 1e3, 2)
                                                         for k, v in by_phase.items()},
            "biggest_gaps": sorted(big, key=lambda x: -x[0])[:20]}


@part("gemm128")
def _():
    """Decode-step GEMMs at 16-128 rows (LLaVA-7B shapes): read rate of F.linear under cuBLAS
    and cuBLASLt, and of x @ W^T with W^T stored [K, N]."""
    F = torch.nn.functional
    shapes = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096),
              "down": (4096, 11008), "lm_head": (32064, 4096)}
    res = R.setdefault("gemm128", {})
    for name, (n, k) in shapes.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        wts = [w.t().contiguous() for w in ws]
        gb = n * k * 2 / 1e9
        for m in (128, 64, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            i = [0]

            def lin():
                i[0] = (i[0] + 1) % 4
                F.linear(x, ws[i[0]])

            def mm_t():
                i[0] = (i[0] + 1) % 4
                torch.mm(x, wts[i[0]])
            row = {}
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                row[f"linear_{lib}"] = round(gb / cuda_time(lin, 30), 3)
                row[f"mm_wt_{lib}"] = round(gb / cuda_time(mm_t, 30), 3)
            torch.backends.cuda.preferred_blas_library("cublas")
            res[f"{name}_M{m}"] = row
            print(name, m, row, flush=True)
        del ws, wts


@part("qwen")
def _():
    from transformers.models.qwen2_vl import modeling_qwen2_vl as m
    from mmhpc.bench.offline import ImageItems
    from mmhpc.models.arch import arch_dir
    from mmhpc.models import load_hf_config
    eng = build_engine("arch:qwen2-vl-7b", 64, max_model_len=8192)
    r = R.setdefault("qwen", {})
    model = eng.runner.model
    r["weights_read_GB"] = round(llm_bytes(model) / 1e9, 3)
    r["floor_ms_weights"] = floor_ms(r["weights_read_GB"])
    r["floor_ms_weights_strict"] = floor_ms(r["weights_read_GB"], strict=True)
    d = decode_b1(eng, "qwen", 1000)
    d["ratio_wall"] = round(d["graphs"] / r["floor_ms_weights"], 3)
    d["ratio_wall_strict"] = round(d["graphs"] / r["floor_ms_weights_strict"], 3)
    d["ratio_gpu"] = round(d["graph_replay_gpu"] / r["floor_ms_weights"], 3)
    r["decode_b1_ctx1000_ms"] = d
    print(r, flush=True)
    save()
    profile_decode(eng, "qwen_b1")
    # ViT at ~1080p
    from PIL import Image
    import numpy as np
    hf_cfg = load_hf_config("arch:qwen2-vl-7b")
    items = ImageItems(arch_dir("arch:qwen2-vl-7b"), hf_cfg)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1080, 1920, 3),
                                                             dtype=np.uint8), "RGB")
    it = items(img)
    r["vit_tokens"] = it.num_tokens
    px = it.pixel_values.to("cuda", torch.bfloat16)
    grid = torch.tensor([list(it.grid_thw)], device="cuda")
    from mmhpc.engine.sequence import MMItem
    for backend in ("cudnn", "flash", "auto"):
        os.environ["MMHPC_VIT_SDPA"] = backend
        r[f"vit_mmhpc_{backend}_ms"] = round(cuda_time(
            lambda: model.encode([MMItem("x", 0, it.num_tokens, it.grid_thw, px)]), 10), 3)
    os.environ["MMHPC_VIT_SDPA"] = "auto"
    enc = lambda: model.encode([MMItem("x", 0, it.num_tokens, it.grid_thw, px)])  # noqa: E731
    pe = model.visual.patch_embed
    fast_pe = pe.__dict__.pop("forward", None)          # HF's Conv3d patch embedding
    r["vit_mmhpc_auto_conv3d_patch_embed_ms"] = round(cuda_time(enc, 10), 3)
    if fast_pe is not None:
        pe.forward = fast_pe
    r["vit_mmhpc_auto_again_ms"] = round(cuda_time(enc, 10), 3)
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        enc()
        torch.cuda.synchronize()
    r["vit_idle"] = _gpu_idle(prof, 20)
    print(json.dumps(r["vit_idle"], indent=1)[:3000], flush=True)
    vis = m.Qwen2VLVisionModel if hasattr(m, "Qwen2VLVisionModel") else \
        m.Qwen2VisionTransformerPretrainedModel
    with torch.device("cuda"):
        hf = vis._from_config(hf_cfg.vision_config, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        r["vit_hf_ms"] = round(cuda_time(lambda: hf(px, grid_thw=grid), 10), 3)
    r["vit_ratio_to_hf"] = round(r["vit_mmhpc_auto_ms"] / r["vit_hf_ms"], 3)
    N, C, I, L = it.grid_thw[1] * it.grid_thw[2], 1280, 5120, 32
    flops = L * (2 * N * (4 * C * C + 2 * C * I) + 4 * N * N * C)
    r["vit_flops_T"] = round(flops / 1e12, 2)
    r["vit_flop_floor_ms"] = round(flops / (R.get("matmul_TFLOPs", 790) * 1e9), 3)
    print(r, flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.encode([MMItem("x", 0, it.num_tokens, it.grid_thw, px)])
        torch.cuda.synchronize()
    t = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    open(os.path.join(OUT, "profile_qwen_vit.txt"), "w").write(t)
    print(t[:4000])
    del eng, hf


if __name__ == "__main__":
    run_parts()
    print(json.dumps(R, indent=1, default=str))

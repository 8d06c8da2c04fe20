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
from types import SimpleNamespace

import torch

from mmhpc.bench.cuda_timing import cuda_time

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
    n, k = 32768, 8192
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    i = [0]

    def gemv():
        i[0] = (i[0] + 1) % 3
        F.linear(x, ws[i[0]])
    ms = cuda_time(gemv, 50)
    reads = {"gemv_32768x8192": round(n * k * 2 / ms / 1e9, 3)}
    del ws
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
                                          "max_num_batched_tokens": 8192},
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


def _recapture(cs, sizes, gemv):
    """Capture the decode graphs of `sizes` again, with the GEMV on or off (the other sizes'
    graphs stay, and with them the shared pool)."""
    cs.decoder.gemv = gemv
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
    if os.environ.get("GEMV_AB", "1") == "1" and cs.decoder.gemv:     # cuBLAS instead
        _recapture(cs, [1], gemv=False)
        res["graphs_cublas"] = round(_decode_steps(eng, f"{key}-c", prompt_len, steps), 3)
        res["graph_replay_gpu_cublas"] = replay_ms(cs, 1, prompt_len, eng.runner.num_blocks)
        _recapture(cs, [1], gemv=True)
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
    """Where a prefill step's time goes: 8192-token steps of LLaVA-1.5-7B (13 prompts of
    576 image + 41 text tokens each, embeddings given), wall per step and a kernel profile."""
    from torch.profiler import ProfilerActivity, profile
    from mmhpc.engine.sequence import MMItem, SamplingParams
    eng = build_engine("arch:llava-1.5-7b", 128)
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
                         "--max-num-seqs", os.environ.get("OFFLINE_MAX_SEQS", "128"),
                         "--preprocess", os.environ.get("PREPROCESS", "overlap"),
                         "--hf", "--hf-batch-sizes", os.environ.get("HF_BS", "64,128"),
                         "--hf-max-requests", str(n_hf),
                         "--json", os.path.join(OUT, "offline.json")])
    R["offline"] = offline.run(args)


@part("offline_ab")
def _():
    """mmhpc alone (no HF), preprocessing first vs overlapped, decode ahead on/off."""
    from mmhpc.bench import offline
    import argparse
    res = R.setdefault("offline_ab", {})
    variants = [("overlap", "1", 128, 8192), ("first", "1", 128, 8192),
                ("overlap", "1", 128, 8192), ("overlap", "0", 128, 8192),
                ("overlap", "1", 144, 8192), ("overlap", "1", 128, 16384)]
    for mode, ahead, seqs, mnbt in variants:
        os.environ["MMHPC_DECODE_AHEAD"] = ahead
        p = argparse.ArgumentParser()
        offline.add_args(p)
        args = p.parse_args(["--model", "arch:llava-1.5-7b", "--random-weights", "--dtype",
                             "bfloat16", "--num-requests", "256", "--image-size", "336",
                             "--prompt-len", "40", "--output-len", "128", "--max-num-seqs",
                             str(seqs), "--max-num-batched-tokens", str(mnbt),
                             "--preprocess", mode])
        m = offline.run(args)["mmhpc"]
        key = f"{mode}_ahead{ahead}_seqs{seqs}_tokens{mnbt}"
        key += "_again" if key in res else ""
        res[key] = {k: m[k] for k in ("total_s", "steps", "output_tokens_per_s",
                                      "steps_by_kind")}
        print(key, res[key], flush=True)
        save()
    os.environ["MMHPC_DECODE_AHEAD"] = "1"


@part("offline_trace")
def _():
    """Chrome trace of the first prefill steps of the offline workload (real CLIP, 336 px
    images, 26 requests per step): where the host leaves the GPU idle."""
    from torch.profiler import ProfilerActivity, profile
    from mmhpc.bench.offline import ImageItems, build_prompt
    from mmhpc.bench.synthetic import make_requests
    from mmhpc.engine.sequence import SamplingParams
    from mmhpc.models import load_hf_config
    from mmhpc.models.arch import arch_dir
    eng = build_engine("arch:llava-1.5-7b", 128)
    items = ImageItems(arch_dir("arch:llava-1.5-7b"), load_hf_config("arch:llava-1.5-7b"))
    reqs = make_requests(80, [(336, 336)], 1, 40, 4, (100, 20000), 0, (items.image_token_id,))

    def add(rs):
        for r in rs:
            its = [items(im) for im in r.images]
            eng.add_request(r.request_id, build_prompt(its, r.text_ids, items.image_token_id),
                            SamplingParams(max_tokens=2, ignore_eos=True), mm_items=its)
    add(reqs[:26])                                      # warm-up
    while eng.has_unfinished_requests():
        eng.step()
    add(reqs[26:])
    torch.cuda.synchronize()
    ts = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            t = time.perf_counter()
            eng.step()
            ts.append(round((time.perf_counter() - t) * 1e3, 1))
        torch.cuda.synchronize()
    R["offline_trace_step_ms"] = ts
    prof.export_chrome_trace(os.path.join(OUT, "trace_prefill.json"))
    t = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)
    open(os.path.join(OUT, "profile_prefill_cpu.txt"), "w").write(t)
    print(ts, flush=True)
    del eng


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
    from torch.profiler import ProfilerActivity, profile
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

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
            os.environ["MMHPC_FAST_PATH"] = "1"
            os.environ["MMHPC_VIT_SDPA"] = "cudnn"
        print(f"----- {name}: {time.perf_counter() - t:.1f} s", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        save()


def cuda_time(fn, iters=20, warmup=3) -> float:
    """Median ms of fn() over iters, by CUDA events."""
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


@part("ceilings")
def _():
    n, k = 32768, 8192
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    i = [0]

    def gemv():
        i[0] = (i[0] + 1) % 3
        torch.nn.functional.linear(x, ws[i[0]])
    ms = cuda_time(gemv, 50)
    R["gemv_read_TBps"] = round(n * k * 2 / ms / 1e9, 3)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time(lambda: a @ b, 20)
    R["matmul_TFLOPs"] = round(2 * 8192 ** 3 / ms / 1e9, 1)
    print(R["gemv_read_TBps"], "TB/s GEMV read;", R["matmul_TFLOPs"], "TFLOP/s bf16 matmul")


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
    # the whole engine, tiny LLaVA / Qwen2-VL in float32: fast path (graphs) == plain torch path
    from mmhpc.bench import offline
    for fam in ("llava", "qwen2_vl"):
        toks = {}
        for fast in ("0", "1"):
            os.environ["MMHPC_FAST_PATH"] = fast
            toks[fast] = _tiny_tokens(fam)
        os.environ["MMHPC_FAST_PATH"] = "1"
        same = sum(a == b for a, b in zip(toks["0"], toks["1"]))
        R[f"tiny_{fam}_fast_vs_torch_tokens_equal"] = f"{same}/{len(toks['0'])}"
    print({k: v for k, v in R.items() if "err" in k or "equal" in k})


def _tiny_tokens(fam):
    from mmhpc.bench.offline import ImageItems, build_prompt, resolve_model_path, _StubProcessor
    from mmhpc.bench.synthetic import make_requests
    from mmhpc.config import Config
    from mmhpc.engine.engine import LLMEngine
    from mmhpc.engine.sequence import SamplingParams
    from mmhpc.models import load_hf_config
    path, d = resolve_model_path(f"tiny:{fam}")
    cfg = Config.from_dict({"model": {"path": path, "dtype": "float32", "max_model_len": 512},
                            "cache": {"num_blocks": 256}, "scheduler": {"max_num_seqs": 8}})
    eng = LLMEngine(cfg, processor=_StubProcessor([2]))
    hf = load_hf_config(path)
    items = ImageItems(d, hf)
    reqs = make_requests(6, [(40, 56), (64, 48)], 1, 7, 12, (16, 600), 1, (items.image_token_id,))
    for r in reqs:
        its = [items(im) for im in r.images]
        eng.add_request(r.request_id, build_prompt(its, r.text_ids, items.image_token_id),
                        SamplingParams(max_tokens=12, ignore_eos=True), mm_items=its)
    out = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [t for r in reqs for t in out[r.request_id]]


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


def decode_b1(eng, key, prompt_len, image_id=None, steps=64):
    """One request, prompt_len tokens (text), decode `steps` tokens; ms/step from host clock
    (whole engine step) and from CUDA events around graph replay (GPU only)."""
    from mmhpc.engine.sequence import SamplingParams
    res = {}
    for graphs in (True, False):
        cs = eng.runner.cuda_steps
        cs.use_graphs = graphs
        rid = f"{key}-{graphs}"
        ids = [1] + torch.randint(100, 20000, (prompt_len - 1,)).tolist()
        eng.add_request(rid, ids, SamplingParams(max_tokens=steps + 2, ignore_eos=True))
        eng.step()                                      # prefill
        torch.cuda.synchronize()
        ts = []
        while eng.has_unfinished_requests():
            t = time.perf_counter()
            eng.step()
            ts.append((time.perf_counter() - t) * 1e3)
        res["graphs" if graphs else "eager"] = round(statistics.median(ts[2:]), 3)
    cs.use_graphs = True
    # GPU time of one replay at batch 1, context ~prompt_len
    b = cs.bufs[1] if hasattr(cs, "bufs") else cs       # the graph of size 1 reads its own buffer
    b.lens[:1] = prompt_len
    b.tables[:1, :prompt_len // eng.runner.block_size + 1] = torch.arange(
        prompt_len // eng.runner.block_size + 1, device="cuda", dtype=torch.int32)
    b.slots[:1] = -1
    res["graph_replay_gpu"] = round(cuda_time(lambda: cs.graphs[1].replay(), 50), 3)
    b.lens.zero_()
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
        for backend in ("cudnn", "flash"):
            os.environ["MMHPC_VIT_SDPA"] = backend
            ms = cuda_time(lambda: model.encode(items()), 10)
            res[f"mmhpc_{backend}_bs{bs}_ms_per_image"] = round(ms / bs, 4)
    os.environ["MMHPC_VIT_SDPA"] = "cudnn"
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


@part("llava")
def _():
    eng = build_engine("arch:llava-1.5-7b", 256)
    r = R.setdefault("llava", {})
    r["weights_read_GB"] = round(llm_bytes(eng.runner.model) / 1e9, 3)
    r["num_blocks"] = eng.runner.num_blocks
    r["decode_b1_ms"] = decode_b1(eng, "llava", 616)
    kv = 616 * 32 * 2 * 4096 * 2                      # K+V bytes read at context 616
    bw = R.get("gemv_read_TBps", 2.5) * 1e12
    r["floor_ms_weights"] = round(r["weights_read_GB"] * 1e9 / bw * 1e3, 3)
    r["floor_ms_weights_plus_kv"] = round((r["weights_read_GB"] * 1e9 + kv) / bw * 1e3, 3)
    r["ratio_to_weight_floor"] = round(r["decode_b1_ms"]["graphs"] / r["floor_ms_weights"], 3)
    print(r, flush=True)
    save()
    # decode step at larger batches (graph replay, context ~700 each)
    cs = eng.runner.cuda_steps
    bs_res = {}
    nb = 700 // 16 + 1
    for bs in (16, 64, 128, 256):
        b = cs.bufs[bs] if hasattr(cs, "bufs") else cs
        b.lens[:bs] = 700
        b.tables[:bs, :nb] = torch.arange(bs * nb, device="cuda", dtype=torch.int32).view(bs, nb) \
            % eng.runner.num_blocks
        b.slots[:bs] = -1
        bs_res[bs] = round(cuda_time(lambda: cs.graphs[bs].replay(), 10), 3)
        b.lens.zero_()
    r["decode_step_ms_by_batch_ctx700"] = bs_res
    print(bs_res, flush=True)
    profile_decode(eng, "llava_b1")
    save()
    r["clip"] = clip_bench(eng)
    print(r["clip"], flush=True)
    del eng


@part("decode")
def _():
    """Issue 8 decode gap only: attention kernel A/B (partition per sequence vs the graph's
    capacity), LLaVA-1.5-7B decode b=1 vs the floor, its profile; CLIP batched profile."""
    from mmhpc.kernels.paged_attention import paged_decode_attention
    r = R.setdefault("decode", {})
    # kernel: b=1, 32 heads (no GQA), head_dim 128, bf16, graph capacity 4096 tokens
    nb_pool, bsz = 512, 16
    kv = torch.randn(2, nb_pool, 32, bsz, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
    tables = torch.arange(256, device="cuda", dtype=torch.int32).view(1, 256)
    kab = {}
    for ctx in (616, 2000, 4096):
        lens = torch.tensor([ctx], device="cuda", dtype=torch.int32)
        outs = {}
        for per_seq in (False, True):
            fn = lambda: paged_decode_attention(q, kv, tables, lens, 128 ** -0.5,  # noqa: E731
                                                max_context_len=4096, per_seq_partition=per_seq)
            outs[per_seq] = fn().float()
            kab[f"ctx{ctx}_{'per_seq' if per_seq else 'capacity'}_us"] = round(
                cuda_time(fn, 200) * 1e3, 2)
        kab[f"ctx{ctx}_max_abs_diff"] = float((outs[True] - outs[False]).abs().max())
    r["attn_kernel_b1_cap4096"] = kab
    print(kab, flush=True)
    del kv
    eng = build_engine("arch:llava-1.5-7b", 256)
    r["weights_read_GB"] = round(llm_bytes(eng.runner.model) / 1e9, 3)
    bw = R.get("gemv_read_TBps", 2.5) * 1e12
    r["floor_ms_weights"] = round(r["weights_read_GB"] * 1e9 / bw * 1e3, 3)
    for ctx in (616, 2000):
        d = decode_b1(eng, f"llava{ctx}", ctx)
        d["ratio_wall"] = round(d["graphs"] / r["floor_ms_weights"], 3)
        d["ratio_gpu"] = round(d["graph_replay_gpu"] / r["floor_ms_weights"], 3)
        r[f"decode_b1_ctx{ctx}_ms"] = d
        print(ctx, d, flush=True)
        save()
    cs = eng.runner.cuda_steps
    bs_res = {}
    nb = 700 // 16 + 1
    for bs in (16, 64, 128, 256):
        b = cs.bufs[bs]
        b.lens[:bs] = 700
        b.tables[:bs, :nb] = torch.arange(bs * nb, device="cuda", dtype=torch.int32).view(bs, nb) \
            % eng.runner.num_blocks
        b.slots[:bs] = -1
        bs_res[bs] = round(cuda_time(lambda: cs.graphs[bs].replay(), 10), 3)
        b.lens.zero_()
    r["decode_step_ms_by_batch_ctx700"] = bs_res
    print(bs_res, flush=True)
    profile_decode(eng, "llava_b1_v2")
    save()
    # CLIP ViT-L/336 batched: time and top kernels
    from torch.profiler import ProfilerActivity, profile
    from mmhpc.engine.sequence import MMItem
    model = eng.runner.model
    px = torch.randn(64, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    items = lambda: [MMItem("x", 0, 576, None, px[i:i + 1]) for i in range(64)]  # noqa: E731
    r["clip_bs64_ms_per_image"] = round(cuda_time(lambda: model.encode(items()), 10) / 64, 4)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            model.encode(items())
        torch.cuda.synchronize()
    t = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    open(os.path.join(OUT, "profile_clip_bs64.txt"), "w").write(t)
    print(r["clip_bs64_ms_per_image"], "ms/image CLIP b64\n", t[:7000], flush=True)
    del eng


@part("decode_host")
def _():
    """Where a b=1 decode step's wall time goes beyond the graph: phases timed on the host
    (scheduler, execute = input prep + replay launch, sampler = GPU wait + argmax sync,
    rest = postprocess), and a chrome trace of 6 steps (GPU idle gaps between replays)."""
    from torch.profiler import ProfilerActivity, profile
    from mmhpc.engine.sequence import SamplingParams
    eng = build_engine("arch:llava-1.5-7b", 256)
    acc: dict = {}

    def timed(obj, attr, key):
        fn = getattr(obj, attr)

        def wrap(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc.setdefault(key, []).append((time.perf_counter() - t) * 1e3)
        setattr(obj, attr, wrap)
    timed(eng.scheduler, "schedule", "schedule")
    timed(eng.runner, "execute", "execute")

    class _TimedSampler:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *a, **k):
            t = time.perf_counter()
            try:
                return self.inner(*a, **k)
            finally:
                acc.setdefault("sampler", []).append((time.perf_counter() - t) * 1e3)

        def __getattr__(self, name):
            return getattr(self.inner, name)
    eng.sampler = _TimedSampler(eng.sampler)
    ids = [1] + torch.randint(100, 20000, (615,)).tolist()
    eng.add_request("h", ids, SamplingParams(max_tokens=70, ignore_eos=True))
    eng.step()
    torch.cuda.synchronize()
    acc.clear()
    walls = []
    for i in range(60):
        t = time.perf_counter()
        eng.step()
        walls.append((time.perf_counter() - t) * 1e3)
    r = R.setdefault("decode_host", {})
    r["wall_ms"] = round(statistics.median(walls[2:]), 3)
    for k, v in acc.items():
        r[k + "_ms"] = round(statistics.median(v[2:]), 3)
    print(r, flush=True)
    eng.add_request("h2", ids, SamplingParams(max_tokens=12, ignore_eos=True))
    eng.step()
    eng.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(6):
            eng.step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(os.path.join(OUT, "trace_decode_b1.json"))
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
                         "--hf", "--hf-batch-sizes", os.environ.get("HF_BS", "64,128"),
                         "--hf-max-requests", str(n_hf),
                         "--json", os.path.join(OUT, "offline.json")])
    R["offline"] = offline.run(args)


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
    r["decode_b1_ms"] = decode_b1(eng, "qwen", 1000)
    bw = R.get("gemv_read_TBps", 2.5) * 1e12
    r["floor_ms_weights"] = round(r["weights_read_GB"] * 1e9 / bw * 1e3, 3)
    r["ratio_to_weight_floor"] = round(r["decode_b1_ms"]["graphs"] / r["floor_ms_weights"], 3)
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
    for backend in ("cudnn", "flash"):
        os.environ["MMHPC_VIT_SDPA"] = backend
        r[f"vit_mmhpc_{backend}_ms"] = round(cuda_time(
            lambda: model.encode([MMItem("x", 0, it.num_tokens, it.grid_thw, px)]), 10), 3)
    os.environ["MMHPC_VIT_SDPA"] = "cudnn"
    vis = m.Qwen2VLVisionModel if hasattr(m, "Qwen2VLVisionModel") else \
        m.Qwen2VisionTransformerPretrainedModel
    with torch.device("cuda"):
        hf = vis._from_config(hf_cfg.vision_config, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        r["vit_hf_ms"] = round(cuda_time(lambda: hf(px, grid_thw=grid), 10), 3)
    r["vit_ratio_to_hf"] = round(min(r["vit_mmhpc_cudnn_ms"], r["vit_mmhpc_flash_ms"])
                                 / r["vit_hf_ms"], 3)
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

"""Issue 23 on one GPU, in one process: LLaVA-v1.6-Mistral-7B and Qwen2.5-VL-7B at real size
(random bf16 weights, `arch:` configs), each

- decode at batch 1 against the weight-read floor, measured as issue 8's bench did: the card's
  read ceilings (one large cuBLAS GEMV: the issue's floor; the best plain read: the strict
  one) and bf16 matmul rate, then one request's `engine.step()` wall time with CUDA graphs and
  decode ahead (median of 64 steps), without decode ahead, and the graph replay's GPU time;
  the language model's weight bytes / the read rate is the floor; a profile of 5 steps;
- the vision path on a ~1080p image (1920 x 1080) against HF's own modules holding the same
  weights, in the same run: first checked (relative error of the embeddings), then timed.
  LLaVA-NeXT: HF's `get_image_features` (CLIP tower, projector, anyres packing) vs our
  `encode`; Qwen2.5-VL: HF's windowed ViT vs ours (fused blocks, windows through
  FlashAttention varlen; A/B: one SDPA per window, SDPA backends). FLOP floors and profiles;
- on the tiny checkpoints, the engine's CUDA fast path gives the plain-torch path's tokens.

GPU:        OUT=/tmp/dense_vlm python3 bench/dense_vlm_gpu.py [llava_next,qwen2_5_vl]
CPU smoke:  python3 bench/dense_vlm_gpu.py --smoke   (tiny checkpoints, a few decode steps; the
            vision check against HF in float32). Results: $OUT/dense_vlm_gpu.json.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
import traceback

import torch

from mmhpc.bench.cuda_timing import cuda_time

OUT = os.environ.get("OUT", "/tmp")
SMOKE = "--smoke" in sys.argv
DEV = "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
# family: (real-size model path, tiny family, decode context at batch 1)
FAMILIES = {"llava_next": ("arch:llava-v1.6-mistral-7b-hf", "llava_next", 2000),
            "qwen2_5_vl": ("arch:Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 1000)}
R: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "smoke": SMOKE}


def save() -> None:
    with open(os.path.join(OUT, "dense_vlm_gpu.json"), "w") as f:
        json.dump(R, f, indent=1, default=str)


# ---- decode at batch 1 ---------------------------------------------------------------------

def ceilings() -> dict:
    """Read ceilings (TB/s) and the bf16 matmul rate (TFLOP/s) of this card."""
    from mmhpc.bench.cuda_timing import gemv_read_tbps
    out = {"gemv_read_TBps": round(gemv_read_tbps(), 3)}    # the unit
    big = torch.randn(2 * 1024 ** 3, device="cuda", dtype=torch.bfloat16)
    out["sum_4GB_TBps"] = round(big.numel() * 2 / cuda_time(big.sum, 10) / 1e9, 3)
    del big
    out["read_ceiling_TBps"] = max(out["gemv_read_TBps"], out["sum_4GB_TBps"])
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out["matmul_TFLOPs"] = round(2 * 8192 ** 3 / cuda_time(lambda: a @ a, 20) / 1e9, 1)
    return out


def build_engine(path: str, **kw):
    from mmhpc.bench.offline import _StubProcessor
    from mmhpc.config import Config
    from mmhpc.engine.engine import LLMEngine
    cfg = Config.from_dict({"model": {"path": path, "random_weights": True,
                                      "dtype": kw.get("dtype", "bfloat16"),
                                      "max_model_len": kw.get("max_model_len", 8192)},
                            "scheduler": {"max_num_seqs": kw.get("max_num_seqs", 8),
                                          "max_num_batched_tokens": kw.get("tokens", 8192)},
                            "cache": {"num_blocks": kw.get("num_blocks", 2048)}})
    t = time.perf_counter()
    eng = LLMEngine(cfg, processor=_StubProcessor([2]))
    _sync()
    print(f"engine {path}: built in {time.perf_counter() - t:.1f} s", flush=True)
    return eng


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def llm_bytes(model) -> int:
    """Bytes a decode step reads: the language model's weights but the embedding table."""
    lm = model.language_model
    n = sum(p.numel() * p.element_size() for name, p in lm.named_parameters()
            if not name.startswith("embed_tokens"))
    return n + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def decode_steps(eng, rid: str, prompt_len: int, steps: int) -> float:
    """Median wall ms of `engine.step()` over `steps` decode steps of one text request."""
    from mmhpc.engine.sequence import SamplingParams
    vocab = eng.runner.model.text_config.vocab_size
    ids = [1] + torch.randint(min(100, vocab // 2), min(20000, vocab), (prompt_len - 1,)).tolist()
    eng.add_request(rid, ids, SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    eng.step()                                          # prefill
    _sync()
    ts = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts[2:] or ts)


def replay_ms(cs, ctx: int, num_blocks: int) -> float:
    """GPU ms of one batch-1 decode step's graph replay at context ctx."""
    b = cs.bufs[1]
    nb = ctx // cs.block_size + 1
    b.lens[:1] = ctx
    b.tables[:1, :nb] = torch.arange(nb, device="cuda", dtype=torch.int32) % num_blocks
    b.slots[:1] = -1
    ms = cuda_time(lambda: cs.replay(1), 50)
    b.lens.zero_()
    return round(ms, 3)


def profile_decode(eng, family: str, steps: int = 5) -> None:
    from torch.profiler import ProfilerActivity, profile

    from mmhpc.engine.sequence import SamplingParams
    eng.add_request(f"{family}-prof", [1] + list(range(100, 700)),
                    SamplingParams(max_tokens=steps + 3, ignore_eos=True))
    eng.step()
    eng.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        while eng.has_unfinished_requests():
            eng.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)
    with open(os.path.join(OUT, f"profile_decode_{family}.txt"), "w") as f:
        f.write(table)
    print(table[:4000], flush=True)


# ---- vision ---------------------------------------------------------------------------------

def time_ms(fn, iters: int = 10) -> float:
    """Median ms of fn(): CUDA events on the GPU, wall clock on the CPU."""
    if DEV == "cuda":
        return round(cuda_time(fn, iters), 3)
    fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(ts), 3)


def image_1080p():
    import numpy as np
    from PIL import Image
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (1080, 1920, 3),
                                                             dtype=np.uint8), "RGB")


def hf_vision(model, family: str):
    """HF's own vision path holding `model`'s weights (HF's default attention): item → its
    embeddings [num_tokens, hidden]."""
    cfg = model.config
    if family == "qwen2_5_vl":
        with torch.device(DEV):                         # HF's class, a fresh instance
            hf = type(model.visual)._from_config(cfg.vision_config, dtype=DTYPE).eval()
        hf.load_state_dict(model.visual.state_dict())

        def run(it):
            out = hf(it.pixel_values, grid_thw=torch.tensor([list(it.grid_thw)], device=DEV))
            return getattr(out, "pooler_output", out)
        return hf, run
    from transformers import LlavaNextModel
    small = copy.deepcopy(cfg)
    small.text_config.num_hidden_layers = 1          # its language model is never run here
    with torch.device(DEV):
        hf = LlavaNextModel._from_config(small, dtype=DTYPE).eval()
    # our tower stops at the deepest layer LLaVA reads: HF's deeper ones keep random weights
    hf.vision_tower.load_state_dict(model.vision_tower.state_dict(), strict=False)
    hf.multi_modal_projector.load_state_dict(model.multi_modal_projector.state_dict())
    with torch.no_grad():
        hf.image_newline.copy_(model.image_newline)

    def run(it):
        out = hf.get_image_features(
            pixel_values=it.pixel_values, image_sizes=torch.tensor([list(it.image_size)],
                                                                   device=DEV),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return getattr(out, "pooler_output", out)[0]
    return hf, run


def vision_flops(model, it, family: str) -> float:
    """Matmul FLOPs of the vision path for one item (attention included)."""
    vc = model.config.vision_config
    if family == "qwen2_5_vl":
        N, C, I, L = it.grid_thw[0] * it.grid_thw[1] * it.grid_thw[2], vc.hidden_size, \
            vc.intermediate_size, vc.depth
        full = len(vc.fullatt_block_indexes)
        W = (vc.window_size // vc.patch_size) ** 2        # tokens of a whole window
        M = vc.spatial_merge_size ** 2
        merger = 2 * (N // M) * (M * C * M * C + M * C * vc.out_hidden_size)
        return L * 2 * N * (4 * C * C + 3 * C * I) + full * 4 * N * N * C \
            + (L - full) * 4 * N * W * C + merger
    tiles = it.pixel_values.shape[0]
    S, C, I = (vc.image_size // vc.patch_size) ** 2 + 1, vc.hidden_size, vc.intermediate_size
    L = vc.num_hidden_layers + 1 + model.config.vision_feature_layer   # layers run (-2: 23)
    H = model.config.text_config.hidden_size
    return tiles * (L * (2 * S * (4 * C * C + 2 * C * I) + 4 * S * S * C)
                    + 2 * (S - 1) * (C * H + H * H))


def vision(eng, family: str, r: dict) -> None:
    """Our vision path vs HF's on a 1920 x 1080 image: check, then time (variants), floor."""
    from mmhpc.bench.inputs import ImageItems
    from mmhpc.bench.offline import resolve_model_path
    from mmhpc.engine import gpu_forward
    from mmhpc.models import load_hf_config
    model = eng.runner.model
    if DEV == "cpu" and family == "qwen2_5_vl":        # the CUDA runner does this at start-up
        gpu_forward.prepare_vision(model)              # (CLIP's fused blocks need Triton)
    path, model_dir = resolve_model_path(FAMILIES[family][0] if not SMOKE
                                         else "tiny:" + FAMILIES[family][1])
    it = ImageItems(model_dir, load_hf_config(path))(image_1080p())
    it.pixel_values = it.pixel_values.to(DEV, DTYPE)
    v = r.setdefault("vision_1080p", {"num_tokens": it.num_tokens,
                                      "pixel_values": list(it.pixel_values.shape)})
    hf, hf_run = hf_vision(model, family)
    v["hf_attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
    with torch.inference_mode():
        want = hf_run(it).float()
        got = model.encode([it])[0].float()
        v["rel_err_vs_hf"] = float((got - want).norm() / want.norm())
        v["check"] = "ok" if got.shape == want.shape and v["rel_err_vs_hf"] < \
            (2e-2 if DTYPE == torch.bfloat16 else 1e-4) else "MISMATCH"
        print(family, "vision check:", v["check"], v["rel_err_vs_hf"], flush=True)
        enc = lambda: model.encode([it])               # noqa: E731
        v["mmhpc_ms"] = time_ms(enc)
        v["hf_ms"] = time_ms(lambda: hf_run(it))
        v["ratio_to_hf"] = round(v["mmhpc_ms"] / v["hf_ms"], 3)
        if DEV == "cuda":
            for backend in ("cudnn", "flash"):          # full-attention layers / CLIP tiles
                os.environ["MMHPC_VIT_SDPA"] = backend
                v[f"mmhpc_sdpa_{backend}_ms"] = time_ms(enc)
            os.environ["MMHPC_VIT_SDPA"] = "auto"
            if family == "qwen2_5_vl":                  # windows one SDPA each, not varlen
                from mmhpc import kernels
                kernels._flash_error, saved = "A/B: off", kernels._flash_error
                v["mmhpc_windows_sdpa_loop_ms"] = time_ms(enc)
                kernels._flash_error = saved
            v["flops_T"] = round(vision_flops(model, it, family) / 1e12, 3)
            v["flop_floor_ms"] = round(vision_flops(model, it, family)
                                       / (R["ceilings"]["matmul_TFLOPs"] * 1e9), 3)
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                enc()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)
            with open(os.path.join(OUT, f"profile_vision_{family}.txt"), "w") as f:
                f.write(table)
            print(table[:3000], flush=True)
    print(family, v, flush=True)
    del hf


def engine_check(family: str, r: dict) -> None:
    """The whole engine on the tiny checkpoint in float32: the CUDA fast path (graphs, decode
    ahead, fused ViT) gives the plain-torch path's greedy tokens (itself == HF, tests/)."""
    from mmhpc.bench.offline import tiny_engine_tokens
    want, _ = tiny_engine_tokens(family, {"MMHPC_FAST_PATH": "0", "MMHPC_DECODE_AHEAD": "0"})
    got, _ = tiny_engine_tokens(family, {"MMHPC_FAST_PATH": "1", "MMHPC_DECODE_AHEAD": "1"})
    r["tiny_fast_vs_torch_tokens_equal"] = f"{sum(a == b for a, b in zip(want, got))}/{len(want)}"
    print(family, "tiny engine, fast vs torch:", r["tiny_fast_vs_torch_tokens_equal"], flush=True)


def decode(eng, family: str, r: dict) -> None:
    ctx = FAMILIES[family][2]
    r["weights_read_GB"] = round(llm_bytes(eng.runner.model) / 1e9, 3)
    if DEV != "cuda":
        r["decode_b1_ms_wall"] = round(decode_steps(eng, f"{family}-smoke", 40, 6), 3)
        return
    c = R["ceilings"]
    floor = round(r["weights_read_GB"] / c["gemv_read_TBps"], 3)          # GB / (TB/s) = ms
    strict = round(r["weights_read_GB"] / c["read_ceiling_TBps"], 3)
    cs = eng.runner.cuda_steps
    d = {"context": ctx, "floor_ms": floor, "floor_ms_strict": strict,
         "graphs_ms": round(decode_steps(eng, f"{family}-g", ctx, 64), 3)}
    cs.ahead_enabled = False
    d["graphs_no_ahead_ms"] = round(decode_steps(eng, f"{family}-n", ctx, 64), 3)
    cs.ahead_enabled = True
    d["graph_replay_gpu_ms"] = replay_ms(cs, ctx, eng.runner.num_blocks)
    d["ratio"] = round(d["graphs_ms"] / floor, 3)
    d["ratio_strict"] = round(d["graphs_ms"] / strict, 3)
    d["ratio_gpu"] = round(d["graph_replay_gpu_ms"] / floor, 3)
    r["decode_b1"] = d
    print(family, "decode b=1:", d, flush=True)
    save()
    profile_decode(eng, family)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    families = args[0].split(",") if args else list(FAMILIES)
    if DEV == "cuda":
        R["ceilings"] = ceilings()
        print("ceilings", R["ceilings"], flush=True)
    for family in families:
        arch, tiny, _ = FAMILIES[family]
        r = R.setdefault(family, {"model": arch if DEV == "cuda" else "tiny:" + tiny})
        try:
            if DEV == "cuda":
                engine_check(tiny, r)
                eng = build_engine(arch)
            else:
                from mmhpc.tools.tiny import tiny_checkpoint
                eng = build_engine(str(tiny_checkpoint(tiny)), max_num_seqs=2, max_model_len=512,
                                   num_blocks=64, tokens=512, dtype="float32")
            decode(eng, family, r)
            vision(eng, family, r)
            del eng
        except Exception:  # noqa: BLE001 - one family's failure must not hide the other's
            traceback.print_exc()
            r["error"] = traceback.format_exc()[-2000:]
        if DEV == "cuda":
            torch.cuda.empty_cache()
        save()
    print(json.dumps(R, indent=1, default=str))


if __name__ == "__main__":
    main()

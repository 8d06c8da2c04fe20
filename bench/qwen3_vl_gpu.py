"""Issue 22 on one GPU, in one process: Qwen3-VL-30B-A3B (random bf16 weights) against HF in the
same run and against its weight-read floors.

Parts (each guarded: a failure prints its traceback and the rest runs):
- ceilings: HBM read rate (one large GEMV; a sum over 4 GB), the floors' unit.
- correctness: a 4-layer model of the real width, HF given OUR weights: greedy tokens of the
  engine (CUDA path: QK-norm, interleaved M-RoPE, DeepStack, grouped-GEMM MoE, graphs) vs HF's
  teacher-forced logprobs; our ViT bundle (embeddings + DeepStack) vs HF's.
- decode: ms per step at batch 1 and 64 (128-token text prompts), ours vs HF generate, vs the
  floors: active bytes at batch 1 (attention, router, 8 experts a layer, lm_head), every
  weight at batch 64; batch 1 again with MMHPC_MOE_DECODE=1 (kernels.moe_decode).
- moe_decode: the two-kernel MoE of decode steps against its torch reference at the real
  sizes, then the correctness part again with it on (it is off by default).
- offline: 256 x (one 448x448 image + 40 text tokens) -> 128 tokens (`mmhpc.bench offline`),
  HF generate at batch 16/32/64 on the first 64 requests.
The whole model (61 GB) fits an H200; on a smaller card (an H100) the depth is cut to 32 of 48
layers and the run says so. `--smoke`: the tiny Qwen3-VL-MoE on the CPU, small counts.
Results: $OUT/qwen3_vl_gpu_<parts>.json. All parts take ~10 min on an H200; under a 10-minute
limit a command, run them in three:

    OUT=/tmp/out PYTHONPATH=$PWD python bench/qwen3_vl_gpu.py ceilings,correctness,moe_decode
    OUT=/tmp/out PYTHONPATH=$PWD python bench/qwen3_vl_gpu.py decode
    OUT=/tmp/out PYTHONPATH=$PWD python bench/qwen3_vl_gpu.py offline
    PYTHONPATH=$PWD python bench/qwen3_vl_gpu.py --smoke                 # CPU smoke, all parts
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import time
import traceback
from pathlib import Path

import torch

OUT = Path(os.environ.get("OUT", "/tmp"))
R: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__}
ARCH = "arch:qwen3-vl-30b-a3b"
H100_LAYERS = 16                  # of 48: what fits beside KV, HF and our copy in 80 GB (32 ran out of memory in the decode part on an H100)


def save() -> None:
    name = "qwen3_vl_gpu" + "".join(f"_{p}" for p in R.get("parts", []))
    (OUT / f"{name}.json").write_text(json.dumps(R, indent=1, default=str))


def model_dir(layers: int | None, smoke: bool) -> Path:
    """A config directory of the model at `layers` depth (None: as released)."""
    if smoke:
        from mmhpc.tools.tiny import tiny_checkpoint
        src = tiny_checkpoint("qwen3_vl_moe")
    else:
        from mmhpc.models.arch import arch_dir
        src = arch_dir(ARCH)
    dst = OUT / f"qwen3_vl_{layers or 'full'}"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.json*"):
        shutil.copy(f, dst / f.name)
    for f in src.glob("*.jinja"):
        shutil.copy(f, dst / f.name)
    if layers:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["text_config"]["num_hidden_layers"] = layers
        (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst


def build_engine(path: Path, dtype: str, max_num_seqs: int = 256, num_blocks: int | None = None):
    """Our engine on random weights; `num_blocks`: a small KV pool (room left for HF)."""
    from mmhpc.bench.offline import _StubProcessor
    from mmhpc.config import Config
    from mmhpc.engine.engine import LLMEngine
    cfg = Config.from_dict({"model": {"path": str(path), "random_weights": True, "dtype": dtype,
                                      "max_model_len": 4096},
                            "scheduler": {"max_num_seqs": max_num_seqs,
                                          "max_num_batched_tokens": 8192},
                            "cache": {"num_blocks": num_blocks} if num_blocks else {}})
    t = time.perf_counter()
    try:
        eng = LLMEngine(cfg, processor=_StubProcessor([2]))
    except Exception as e:  # noqa: BLE001 - e.g. a decode graph that cannot be captured
        if os.environ.get("MMHPC_CUDA_GRAPHS") == "0" or not torch.cuda.is_available():
            raise
        traceback.print_exc()
        R["graphs_failed"] = f"{type(e).__name__}: {e}"[:500]
        print("NOTE: engine without CUDA graphs from here on", flush=True)
        os.environ["MMHPC_CUDA_GRAPHS"] = "0"
        free()
        eng = LLMEngine(cfg, processor=_StubProcessor([2]))
    sync()
    print(f"engine {path.name}: built (+ graphs) in {time.perf_counter() - t:.1f} s", flush=True)
    return eng


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def weight_bytes(model) -> dict:
    """Bytes a decode step reads: `active` at batch 1 (top-k experts a layer), `all` (every
    weight but the embedding table: batch 64 touches every expert)."""
    tc = model.text_config
    experts = dense = 0
    for name, p in model.language_model.named_parameters():
        if name.startswith("embed_tokens"):
            continue
        if ".experts." in name:
            experts += p.numel() * p.element_size()
        else:
            dense += p.numel() * p.element_size()
    dense += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    k, e = getattr(tc, "num_experts_per_tok", 1), getattr(tc, "num_experts", 1) or 1
    return {"active": dense + experts * k // e, "all": dense + experts}


# ------------------------------------------------------------------------------ parts
def ceilings(args) -> None:
    from mmhpc.bench.cuda_timing import cuda_time, gemv_read_tbps
    gemv_tbps = gemv_read_tbps()
    big = torch.randn(2 * 1024 ** 3, device="cuda", dtype=torch.bfloat16)
    sum_tbps = big.numel() * 2 / cuda_time(lambda: big.sum(), 10) / 1e9
    free(big)
    R["read_TBps"] = {"gemv_32768x8192": round(gemv_tbps, 3), "sum_4GB": round(sum_tbps, 3)}
    R["floor_TBps"] = round(gemv_tbps, 3)            # the unit: one large GEMV
    print("read TB/s", R["read_TBps"], flush=True)


def _share_weights(ours, hf) -> None:
    """HF's parameters := copies of ours (names `model.` + ours; fused experts transposed where
    this transformers version keeps them [E, in, out])."""
    own = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            src = own[name.removeprefix("model.")] if name.startswith("model.") else own[name]
            p.copy_(src if src.shape == p.shape else src.transpose(-1, -2))


def correctness(args, tag: str = "correctness") -> None:
    from transformers import AutoModelForImageTextToText

    from mmhpc.bench.hf_baseline import takes_token_types
    from mmhpc.bench.offline import ImageItems
    from mmhpc.bench.synthetic import make_requests
    from mmhpc.engine.sequence import SamplingParams
    path = model_dir(None if args.smoke else 4, args.smoke)
    eng = build_engine(path, args.dtype, max_num_seqs=8, num_blocks=1024)
    ours = eng.runner.model
    dev, dtype = eng.runner.device, eng.runner.dtype
    with torch.device(dev):
        hf = AutoModelForImageTextToText.from_config(ours.config, dtype=dtype).eval()
    _share_weights(ours, hf)
    images = ImageItems(path, ours.config)
    vocab = (16, min(ours.text_config.vocab_size, 32000))
    reqs = make_requests(3, [(448, 448), (320, 512)], 1, 40, 16, vocab, 7,
                         (images.image_token_id,))
    reqs[2].images = reqs[0].images[:1] + reqs[1].images[:1]            # two mixed sizes
    reqs.append(make_requests(1, [], 0, 40, 16, vocab, 8)[0])           # text only
    n, rows = 16, []
    for r in reqs:
        items = [images(im) for im in r.images]
        ids = [1]                          # each image between vision start / end, as HF's
        for it in items:
            ids.append(ours.config.vision_start_token_id)
            it.offset = len(ids)
            ids += [images.image_token_id] * it.num_tokens + [ours.config.vision_end_token_id]
        ids += r.text_ids
        eng.add_request(r.request_id, ids, SamplingParams(max_tokens=n, ignore_eos=True), items)
        toks: list[int] = []
        while eng.has_unfinished_requests():
            toks += [t for o in eng.step() for t in o.new_token_ids]
        seq = torch.tensor([ids + toks], device=dev)
        kw = {}
        if items:
            kw["pixel_values"] = torch.cat([it.pixel_values for it in items]).to(dev, dtype)
            kw["image_grid_thw"] = torch.tensor([list(it.grid_thw) for it in items], device=dev)
            if takes_token_types(hf):
                kw["mm_token_type_ids"] = (seq == images.image_token_id).int()
        with torch.no_grad():                      # HF teacher-forced on our tokens
            logits = hf(input_ids=seq, **kw).logits[0, len(ids) - 1:-1].float()
        lp = torch.log_softmax(logits, -1)
        chosen = lp[torch.arange(n), torch.tensor(toks, device=dev)]
        gap = (lp.max(-1).values - chosen).tolist()        # 0 where HF picks our token
        rows.append({"images": [f"{im.width}x{im.height}" for im in r.images],
                     "hf_argmax_agree": sum(g == 0 for g in gap), "tokens": n,
                     "max_logprob_gap": round(max(gap), 4)})
        print(tag, rows[-1], flush=True)
        if items:             # the engine's ViT bundles (embeddings + DeepStack) against HF's
            with torch.no_grad():
                out = hf.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"])
            embeds, deep = (out.pooler_output, out.deepstack_features) \
                if hasattr(out, "deepstack_features") else out          # older: a tuple
            ref = torch.cat([torch.cat(embeds), *[torch.cat(d) if isinstance(d, (list, tuple))
                                                   else d for d in deep]], dim=1).float()
            got = torch.cat([it.embeddings for it in items]).float()
            rows[-1]["vit_rel_err"] = round(((got - ref).norm() / ref.norm()).item(), 5)
    R[tag] = rows
    free(eng, ours, hf)


def moe_decode_check(args) -> None:
    """kernels.moe_decode vs its reference, then the whole 4-layer model with
    MMHPC_MOE_DECODE=1 against HF (`correctness`)."""
    if not _moe_decode_kernels_ok(args):
        raise RuntimeError(f"moe_decode disagrees with its reference: {R['moe_decode_rel_err']}")
    os.environ["MMHPC_MOE_DECODE"] = "1"
    try:
        correctness(args, "correctness_moe_decode")
    finally:
        os.environ.pop("MMHPC_MOE_DECODE", None)


def _moe_decode_kernels_ok(args) -> bool:
    """kernels.moe_decode vs its torch reference (x [T, 2048], 128 experts of 768, top 8):
    relative error within 2e-2 at T = 1 and 4."""
    from mmhpc.kernels.moe_decode import moe_decode, reference
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    E, H, I, k = (8, 64, 48, 2) if args.smoke else (128, 2048, 768, 8)
    gu = torch.randn(E, 2 * I, H, device=dev, dtype=dt, generator=g) * H ** -0.5
    down = torch.randn(E, H, I, device=dev, dtype=dt, generator=g) * I ** -0.5
    errs = {}
    for T in (1, 4):
        x = torch.randn(T, H, device=dev, dtype=dt, generator=g)
        ids = torch.stack([torch.randperm(E, device=dev, generator=g)[:k] for _ in range(T)])
        w = torch.softmax(torch.randn(T, k, device=dev, generator=g), -1).to(dt)
        ref = reference(x, gu, down, ids, w).float()
        got = moe_decode(x, gu, down, ids, w).float()
        errs[f"T{T}"] = round(((got - ref).norm() / ref.norm()).item(), 5)
    R["moe_decode_rel_err"] = errs
    print("moe_decode vs reference:", errs, flush=True)
    free(gu, down)
    return max(errs.values()) <= 2e-2


def _moe_decode_graphs(eng, on: bool) -> bool:
    """Switch the engine's decoder to (or from) kernels.moe_decode and capture the batch-1
    decode graph again (other sizes run eager afterwards). False: no CUDA path."""
    cs = eng.runner.cuda_steps
    if cs is None:
        return False
    cs.decoder.moe_decode = on
    for n in list(cs.graphs):
        cs.graphs.pop(n)
        cs.logits.pop(n, None)
    sync()
    cs.capture([1])
    return True


def _ours_decode(eng, batch: int, prompt_len: int, steps: int, vocab: int) -> float:
    """Median ms of `engine.step()` over decode steps with `batch` running requests."""
    from mmhpc.engine.sequence import SamplingParams
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        ids = torch.randint(16, vocab, (prompt_len,), generator=g).tolist()
        eng.add_request(f"d{batch}-{i}", ids, SamplingParams(max_tokens=steps + 4, ignore_eos=True))
    seen: set[str] = set()
    while len(seen) < batch:                                    # prefills (+ first tokens)
        seen |= {o.request_id for o in eng.step()}
    sync()
    ts = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts[2:-2] or ts)


def _hf_decode(hf, batch: int, prompt_len: int, steps: int, vocab: int, device) -> float:
    """HF generate: (time for 1 + steps new tokens - time for 1) / steps, in ms."""
    ids = torch.randint(16, vocab, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                        do_sample=False)
        sync()
        return time.perf_counter() - t
    gen(2)                                                          # warm-up
    return (gen(steps + 1) - gen(1)) / steps * 1e3


def decode(args) -> None:
    from mmhpc.bench.hf_baseline import build_hf_model
    from mmhpc.models import load_hf_config
    path = model_dir(args.layers, args.smoke)
    batches, steps, plen = args.decode_batches, args.decode_steps, 128
    tc = load_hf_config(path).text_config
    res: dict = {"layers": tc.num_hidden_layers}
    vocab = min(tc.vocab_size, 20000)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    hf = build_hf_model(str(path), load_hf_config(path), dtype, dev)     # HF first, then freed
    for b in batches:
        res[f"hf_ms_b{b}"] = round(_hf_decode(hf, b, plen, steps, vocab, dev), 3)
        print(f"hf decode b{b}: {res[f'hf_ms_b{b}']} ms/step", flush=True)
    free(hf)
    eng = build_engine(path, args.dtype, max_num_seqs=max(batches))
    wb = weight_bytes(eng.runner.model)
    res["active_GB"], res["all_GB"] = round(wb["active"] / 1e9, 3), round(wb["all"] / 1e9, 3)
    if "floor_TBps" not in R and torch.cuda.is_available() and not args.smoke:
        ceilings(args)                          # the floors' unit, when run as a part alone
    tbps = R.get("floor_TBps")
    for b in batches:
        ms = _ours_decode(eng, b, plen, steps, vocab)
        res[f"ours_ms_b{b}"] = round(ms, 3)
        res[f"speedup_vs_hf_b{b}"] = round(res[f"hf_ms_b{b}"] / ms, 2)
        if tbps:
            floor = (wb["active"] if b == 1 else wb["all"]) / tbps / 1e9
            res[f"floor_ms_b{b}"] = round(floor, 3)
            res[f"x_floor_b{b}"] = round(ms / floor, 2)
        print(f"ours decode b{b}: {ms:.3f} ms/step", {k: v for k, v in res.items()
                                                      if k.endswith(f"b{b}")}, flush=True)
    R["decode"] = res
    if _moe_decode_kernels_ok(args) and _moe_decode_graphs(eng, True):
        ms = _ours_decode(eng, 1, plen, steps, vocab)
        res["ours_ms_b1_moe_decode"] = round(ms, 3)
        if res.get("floor_ms_b1"):
            res["x_floor_b1_moe_decode"] = round(ms / res["floor_ms_b1"], 2)
        print(f"ours decode b1, MMHPC_MOE_DECODE=1: {ms:.3f} ms/step", flush=True)
    free(eng)


def offline(args) -> None:
    from mmhpc.bench.offline import add_args, run
    p = argparse.ArgumentParser()
    add_args(p)
    path = model_dir(args.layers, args.smoke)
    a = p.parse_args(["--model", str(path), "--random-weights", "--dtype", args.dtype,
                      "--num-requests", str(args.num_requests), "--image-size", "448",
                      "--prompt-len", "40", "--output-len", str(args.output_len), "--hf",
                      "--hf-batch-sizes", args.hf_batch_sizes,
                      "--hf-max-requests", str(args.hf_max_requests),
                      "--json", str(OUT / "qwen3_vl_offline.json")])
    out = run(a)
    R["offline"] = {k: out.get(k) for k in ("hf_best", "speedup_vs_hf_best")}
    R["offline"]["mmhpc_tokens_per_s"] = out.get("mmhpc", {}).get("output_tokens_per_s")


PARTS = {"ceilings": ceilings, "correctness": correctness, "moe_decode": moe_decode_check,
         "decode": decode, "offline": offline}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("parts", nargs="?", default=",".join(PARTS))
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    args = p.parse_args()
    gpu = torch.cuda.is_available() and not args.smoke
    R["device"] = torch.cuda.get_device_name() if gpu else "cpu"
    args.dtype = "bfloat16" if gpu else "float32"
    args.layers = None
    if gpu and torch.cuda.get_device_properties(0).total_memory < 100 * 1024 ** 3:
        args.layers = H100_LAYERS
        print(f"NOTE: {R['device']} has < 100 GiB: the language model is cut to {H100_LAYERS} "
              f"of 48 layers (floors and HF use the same depth)", flush=True)
    R["layers"] = args.layers or "all (48)"
    R["parts"] = args.parts.split(",")
    if args.smoke:
        args.decode_batches, args.decode_steps = [1, 4], 4
        args.num_requests, args.output_len, args.hf_batch_sizes, args.hf_max_requests = \
            4, 8, "2,4", 4
    else:
        args.decode_batches, args.decode_steps = [1, 64], 32
        args.num_requests, args.output_len, args.hf_batch_sizes, args.hf_max_requests = \
            256, 128, "16,32,64", 64
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.parts.split(","):
        if name == "ceilings" and not gpu:
            continue
        t = time.perf_counter()
        print(f"\n===== {name} =====", flush=True)
        try:
            PARTS[name](args)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            R.setdefault("errors", {})[name] = traceback.format_exc()[-1500:]
        print(f"----- {name}: {time.perf_counter() - t:.1f} s", flush=True)
        free()
        save()
    print(json.dumps(R, indent=1, default=str))


if __name__ == "__main__":
    main()

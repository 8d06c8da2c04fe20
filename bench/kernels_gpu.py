"""Time the Triton kernels on one GPU against the card's measured ceilings and plain torch.

    python3 bench/kernels_gpu.py [--out DIR] [--quick]

1. ceilings: device-to-device copy (bytes read + written) and the GEMV weight-read floor of a
   LLaVA-7B (Llama-2-7B) decoder, 32 layers + lm_head in bf16, replayed from a CUDA graph;
2. paged decode attention, LLaVA-7B shapes (32 heads, head_dim 128, block 16, bf16) at batch
   1/8/64 x context 616/2048/8192: Triton eager (L2 flushed), Triton in a CUDA graph (rotating
   over enough block tables to defeat the 50 MB L2), the plain-torch reference; GB/s = KV bytes
   read / time; a small sweep of tile sizes;
3. prefill attention and the fused small ops against torch.
Every section runs even if another fails; a table goes to stdout and JSON/markdown to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from mmhpc.kernels import paged_attention as tk  # noqa: E402
from mmhpc.bench.cuda_timing import graph_time_ms  # noqa: E402
from mmhpc.kernels import reference  # noqa: E402

DEV = "cuda"
BLOCK = 16
RESULTS: dict = {}
LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def section(name):
    def wrap(fn):
        def run(*a, **kw):
            t0 = time.time()
            say(f"\n## {name}")
            try:
                fn(*a, **kw)
            except Exception:  # keep going: the other sections still report
                say("FAILED:\n" + traceback.format_exc())
            say(f"({name}: {time.time() - t0:.1f} s)")
            torch.cuda.empty_cache()
        return run
    return wrap


@section("ceilings: copy bandwidth and the decoder weight-read floor")
def bench_ceilings():
    n = 1 << 30                                               # 2 GiB of bf16
    src = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    copy_gbs = 2 * src.numel() * 2 / ms / 1e6
    RESULTS["copy_GBps"] = copy_gbs
    say(f"d2d copy 2 GiB: {ms:.3f} ms -> {copy_gbs:.0f} GB/s (read + write)")
    del src, dst

    # Llama-2-7B decoder (LLaVA-1.5-7B's LM): per layer qkv, o, gate_up, down; plus lm_head
    hidden, inter, vocab, layers = 4096, 11008, 32000, 32
    # nn.Linear layout [out, in], applied as F.linear(x, w) like the engine does
    shapes = [(3 * hidden, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)]
    weights = [torch.empty(o, i, device=DEV, dtype=torch.bfloat16).normal_(0, 0.02)
               for _ in range(layers) for (o, i) in shapes]
    weights.append(torch.empty(vocab, hidden, device=DEV, dtype=torch.bfloat16).normal_(0, 0.02))
    total_bytes = sum(w.numel() * 2 for w in weights)
    RESULTS["weights_GB"] = total_bytes / 1e9
    say(f"decoder weights: {total_bytes / 1e9:.2f} GB bf16 ({len(weights)} matrices)")
    RESULTS["weight_floor"] = {}
    for batch in (1, 8, 64):
        xs = {k: torch.randn(batch, k, device=DEV, dtype=torch.bfloat16) for k in (hidden, inter)}
        calls = [(lambda w=w: torch.nn.functional.linear(xs[w.shape[1]], w)) for w in weights]
        ms = graph_time_ms([lambda: [c() for c in calls]], replays=10)
        gbs = total_bytes / ms / 1e6
        RESULTS["weight_floor"][batch] = {"ms": ms, "GBps": gbs}
        say(f"GEMV chain batch {batch:3d}: {ms:.3f} ms/step -> {gbs:.0f} GB/s of weights "
            f"({gbs / RESULTS['copy_GBps'] * 100:.0f}% of copy bandwidth)")
    del weights


def _decode_inputs(batch, ctx, num_sets, heads=32, kv_heads=32, head_dim=128):
    blocks_per_seq = math.ceil(ctx / BLOCK)
    num_blocks = num_sets * batch * blocks_per_seq
    kv = torch.empty(2, num_blocks, kv_heads, BLOCK, head_dim, device=DEV,
                     dtype=torch.bfloat16).normal_()
    perm = torch.randperm(num_blocks, device=DEV).to(torch.int32)
    tables = perm.view(num_sets, batch, blocks_per_seq)
    qs = torch.randn(num_sets, batch, heads, head_dim, device=DEV, dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx, device=DEV, dtype=torch.int32)
    return kv, tables, qs, lens


@section("paged decode attention, LLaVA-7B shapes (Hq=Hkv=32, D=128, block 16, bf16)")
def bench_decode(quick: bool):
    copy_gbs = RESULTS.get("copy_GBps", float("nan"))
    rows = []
    say("| batch | ctx | KV MB | splits | triton graph us | GB/s | % copy | triton eager us "
        "| torch ref us | GB/s | speed-up | rel err |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for batch in (1, 8, 64):
        for ctx in (616, 2048, 8192):
            kv_bytes = 2 * batch * ctx * 32 * 128 * 2
            num_sets = max(1, min(32, math.ceil(256e6 / kv_bytes)))
            kv, tables, qs, lens = _decode_inputs(batch, ctx, num_sets)
            outs = torch.empty_like(qs)
            scale = 128 ** -0.5
            fns = [(lambda i=i: tk.paged_decode_attention(qs[i], kv, tables[i], lens, scale,
                                                          max_context_len=ctx, out=outs[i]))
                   for i in range(num_sets)]
            fns[0]()
            nb = min(batch, 2)     # reference in fp32 on the first sequences (inputs upcast)
            ref = reference.paged_decode_attention(qs[0, :nb].float(), kv, tables[0, :nb],
                                                   lens[:nb], scale)
            err = ((outs[0, :nb].float() - ref).norm() / ref.norm()).item()
            g_ms = graph_time_ms(fns)
            e_ms = do_bench(fns[0], return_mode="median")
            r_ms = float("nan")
            if not (quick and kv_bytes > 1e9):
                r_ms = do_bench(lambda: reference.paged_decode_attention(
                    qs[0], kv, tables[0], lens, scale), warmup=5, rep=50, return_mode="median")
            splits = tk.decode_num_splits(batch, 32, ctx)
            gbs, rgbs = kv_bytes / g_ms / 1e6, kv_bytes / r_ms / 1e6
            row = dict(batch=batch, ctx=ctx, kv_MB=kv_bytes / 1e6, splits=splits,
                       graph_us=g_ms * 1e3, GBps=gbs, eager_us=e_ms * 1e3, ref_us=r_ms * 1e3,
                       ref_GBps=rgbs, rel_err=err)
            rows.append(row)
            say(f"| {batch} | {ctx} | {kv_bytes / 1e6:.1f} | {splits} | {g_ms * 1e3:.1f} | "
                f"{gbs:.0f} | {gbs / copy_gbs * 100:.0f}% | {e_ms * 1e3:.1f} | "
                f"{r_ms * 1e3:.0f} | {rgbs:.0f} | {r_ms / g_ms:.0f}x | {err:.1e} |")
            del kv, tables, qs, outs
            torch.cuda.empty_cache()
    RESULTS["decode"] = rows


@section("decode tile sweep (graph-timed us; default is block_n=64, warps=4, stages=2)")
def bench_decode_sweep():
    variants = [dict(block_n=bn, num_warps=w, num_stages=s)
                for bn, w, s in [(64, 4, 2), (32, 4, 2), (128, 4, 2), (128, 8, 2), (64, 4, 3)]]
    out = {}
    for batch, ctx in [(1, 8192), (8, 2048), (64, 2048), (64, 8192)]:
        kv_bytes = 2 * batch * ctx * 32 * 128 * 2
        num_sets = max(1, min(32, math.ceil(256e6 / kv_bytes)))
        kv, tables, qs, lens = _decode_inputs(batch, ctx, num_sets)
        outs = torch.empty_like(qs)
        base = tk.decode_num_splits(batch, 32, ctx)
        cells = []
        for var in variants + [dict(num_splits=max(1, base * 2)), dict(num_splits=max(1, base // 2))]:
            try:
                fns = [(lambda i=i: tk.paged_decode_attention(
                    qs[i], kv, tables[i], lens, 128 ** -0.5, max_context_len=ctx, out=outs[i],
                    **var)) for i in range(num_sets)]
                ms = graph_time_ms(fns)
                cells.append(f"{var}: {ms * 1e3:.1f} us ({kv_bytes / ms / 1e6:.0f} GB/s)")
                out[f"{batch}x{ctx} {var}"] = ms * 1e3
            except Exception as e:  # a tile that does not fit is reported, not fatal
                cells.append(f"{var}: FAILED {type(e).__name__}: {str(e)[:120]}")
        say(f"batch {batch} ctx {ctx} (splits {base}):")
        for c in cells:
            say("    " + c)
        del kv, tables, qs, outs
        torch.cuda.empty_cache()
    RESULTS["decode_sweep"] = out


@section("prefill attention (bf16, Hq=Hkv=32, D=128) vs torch SDPA on contiguous q/k/v")
def bench_prefill():
    F = torch.nn.functional
    rows = []
    for chunk, prior, batch in [(2048, 0, 1), (512, 1536, 1), (616, 0, 8), (4096, 0, 1)]:
        ctx = chunk + prior
        blocks = math.ceil(ctx / BLOCK)
        kv = torch.empty(2, batch * blocks, 32, BLOCK, 128, device=DEV,
                         dtype=torch.bfloat16).normal_()
        tables = torch.randperm(batch * blocks, device=DEV).to(torch.int32).view(batch, blocks)
        q = torch.randn(batch * chunk, 32, 128, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(batch * chunk, 32, 128, device=DEV, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cu = torch.arange(0, batch + 1, device=DEV, dtype=torch.int32) * chunk
        lens = torch.full((batch,), ctx, device=DEV, dtype=torch.int32)
        slots = (tables.long()[:, :, None] * BLOCK + torch.arange(BLOCK, device=DEV)).view(batch, -1)
        slots = slots[:, prior:ctx].reshape(-1)
        tk.write_kv(k, v, kv, slots)
        call = lambda: tk.paged_prefill_attention(  # noqa: E731
            q, k, v, cu, kv, tables, lens, 128 ** -0.5, max_seqlen_q=chunk)
        out = call()
        ref = reference.paged_prefill_attention(q[:chunk].float(), k, v, cu[:2], kv,
                                                tables[:1], lens[:1], 128 ** -0.5)
        err = ((out[:chunk].float() - ref).norm() / ref.norm()).item()
        ms = do_bench(call, return_mode="median")
        flops = 4 * 32 * 128 * batch * sum(prior + i + 1 for i in range(chunk))
        w_ms = do_bench(lambda: tk.write_kv(k, v, kv, slots), return_mode="median")
        sdpa_ms = float("nan")
        if prior == 0:
            qd, kd, vd = (t.view(batch, chunk, 32, 128).transpose(1, 2) for t in (q, k, v))
            sdpa_ms = do_bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True),
                               return_mode="median")
        rows.append(dict(chunk=chunk, prior=prior, batch=batch, ms=ms, TFLOPs=flops / ms / 1e9,
                         sdpa_ms=sdpa_ms, write_kv_ms=w_ms, rel_err=err))
        say(f"chunk {chunk:5d} prior {prior:5d} x{batch}: triton {ms:.3f} ms "
            f"({flops / ms / 1e9:.0f} TFLOP/s), SDPA(flash, no cache) {sdpa_ms:.3f} ms, "
            f"write_kv {w_ms * 1e3:.1f} us, rel err {err:.1e}")
        del kv, q, k, v
    RESULTS["prefill"] = rows


@section("fused small ops vs torch (bf16)")
def bench_small_ops():
    rows = []
    for tokens in (64, 4096):
        x = torch.randn(tokens, 4096, device=DEV, dtype=torch.bfloat16)
        r = torch.randn_like(x)
        w = torch.randn(4096, device=DEV, dtype=torch.bfloat16)
        t_ms = do_bench(lambda: tk.rms_norm(x, w, 1e-6, residual=r), return_mode="median")
        r_ms = do_bench(lambda: reference.rms_norm(x, w, 1e-6, residual=r), return_mode="median")
        gu = torch.randn(tokens, 2 * 11008, device=DEV, dtype=torch.bfloat16)
        ts_ms = do_bench(lambda: tk.silu_and_mul(gu), return_mode="median")
        rs_ms = do_bench(lambda: reference.silu_and_mul(gu), return_mode="median")
        rows.append(dict(tokens=tokens, rms_us=t_ms * 1e3, rms_torch_us=r_ms * 1e3,
                         silu_us=ts_ms * 1e3, silu_torch_us=rs_ms * 1e3))
        say(f"tokens {tokens:5d}: add+rms_norm triton {t_ms * 1e3:.1f} us vs torch "
            f"{r_ms * 1e3:.1f} us; silu_and_mul triton {ts_ms * 1e3:.1f} us vs torch "
            f"{rs_ms * 1e3:.1f} us")
    RESULTS["small_ops"] = rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="skip the slowest reference timings")
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    RESULTS["device"] = dict(name=props.name, sms=props.multi_processor_count,
                             mem_GB=props.total_memory / 1e9, torch=torch.__version__,
                             triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M"))
    say(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
        f"triton {triton.__version__}, {RESULTS['device']['date']}")
    torch.manual_seed(0)
    bench_ceilings()
    bench_decode(args.quick)
    bench_prefill()
    bench_small_ops()
    if not args.no_sweep:
        bench_decode_sweep()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()

"""Triton kernels (mmhpc.kernels.paged_attention) against the plain-torch reference in float64.

GPU tests are marked `gpu` (run them on the GPU machine: bench/gpu_run.sh). The CPU test at the
end checks the reference itself against dense SDPA. Every check draws fresh random inputs,
poisons the output with NaN first, and compares ||out - ref|| / ||ref||.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mmhpc.kernels import reference

HAS_CUDA = torch.cuda.is_available()
try:
    from mmhpc.kernels import paged_attention as triton_impl
except ImportError:
    triton_impl = None

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_CUDA or triton_impl is None, reason="needs CUDA + triton")

# relative-error bounds (METHOD.md): fp32 arithmetic far under 1e-3, bf16/fp16 operands < 1e-2
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}

# (batch, Hq, Hkv, head_dim, context lengths) -- GQA ratios 1/4/8, lengths off the block size
DECODE_CASES = [
    (1, 8, 8, 128, [1]),
    (1, 32, 32, 128, [616]),
    (3, 16, 4, 64, [17, 1000, 33]),
    (4, 32, 4, 128, [2049, 5, 300, 16]),
    (8, 32, 8, 128, [8191, 1, 777, 4000, 15, 64, 129, 2500]),
    (2, 28, 4, 128, [3000, 0]),          # Qwen2-VL-7B heads (G=7); a padding row (len 0)
]
PREFILL_CASES = [   # (Hq, Hkv, D, [(chunk_len, prior_len)])
    (8, 8, 128, [(1, 0), (17, 0), (100, 0)]),
    (16, 4, 64, [(37, 20), (5, 0), (64, 300)]),
    (32, 4, 128, [(130, 0), (1, 999), (200, 33)]),
]
BLOCK_SIZE = 16


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN (unwritten or bad) output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _paged(lens, num_kv_heads, head_dim, dtype, device, spare=7):
    """A random cache with shuffled blocks; returns (kv_cache_layer, block_tables int32)."""
    blocks_per_seq = [max(1, math.ceil(n / BLOCK_SIZE)) for n in lens]
    num_blocks = sum(blocks_per_seq) + spare
    kv = torch.randn(2, num_blocks, num_kv_heads, BLOCK_SIZE, head_dim, device=device).to(dtype)
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    max_blocks = max(blocks_per_seq) + 2
    tables = torch.full((len(lens), max_blocks), -1, dtype=torch.int32, device=device)
    i = 0
    for b, nb in enumerate(blocks_per_seq):
        tables[b, :nb] = perm[i:i + nb]
        i += nb
    tables[tables < 0] = perm[-1]   # unused entries point at a real (spare) block
    return kv, tables


def _slot_mapping(tables, chunks):
    """int64 cache slots of each chunk's new tokens: chunks are (new tokens, cached prefix)."""
    slots = [int(tables[b, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE
             for b, (c, p) in enumerate(chunks) for pos in range(p, p + c)]
    return torch.tensor(slots, dtype=torch.int64, device=tables.device)


def check_decode(impl, device, dtype, batch, num_heads, num_kv_heads, head_dim, lens,
                 num_splits=None) -> float:
    lens = (lens * batch)[:batch]
    kv, tables = _paged(lens, num_kv_heads, head_dim, dtype, device)
    q = torch.randn(batch, num_heads, head_dim, device=device).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    kwargs = {} if num_splits is None else {"num_splits": num_splits}
    impl.paged_decode_attention(q, kv, tables, context_lens, scale, max_context_len=max(lens),
                                out=out, **kwargs)
    ref = reference.paged_decode_attention(q.double(), kv.double(), tables, context_lens, scale)
    err = _rel(out, ref)
    assert err < TOL[dtype], (dtype, batch, num_heads, num_kv_heads, head_dim, lens, err)
    return err


def check_prefill(impl, device, dtype, num_heads, num_kv_heads, head_dim, chunks) -> float:
    lens = [c + p for c, p in chunks]
    kv, tables = _paged(lens, num_kv_heads, head_dim, dtype, device)
    num_tokens = sum(c for c, _ in chunks)
    q = torch.randn(num_tokens, num_heads, head_dim, device=device).to(dtype)
    kv_rows = torch.randn(num_tokens, 2, num_kv_heads, head_dim, device=device).to(dtype)
    k, v = kv_rows[:, 0], kv_rows[:, 1]         # strided rows, as the views of a fused qkv
    cu = [0]
    for c, _ in chunks:
        cu.append(cu[-1] + c)
    impl.write_kv(k, v, kv, _slot_mapping(tables, chunks))
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    impl.paged_prefill_attention(q, k, v, cu_seqlens, kv, tables, context_lens, scale,
                                 max_seqlen_q=max(c for c, _ in chunks), out=out)
    ref = reference.paged_prefill_attention(q.double(), k.double(), v.double(), cu_seqlens,
                                            kv.double(), tables, context_lens, scale)
    err = _rel(out, ref)
    assert err < TOL[dtype], (dtype, num_heads, num_kv_heads, head_dim, chunks, err)
    return err


def check_write_kv(impl, device, dtype) -> None:
    kv, _ = _paged([100], 4, 128, dtype, device, spare=10)
    num_slots = kv.shape[1] * BLOCK_SIZE
    slots = torch.randperm(num_slots, device=device)[:50]
    slots[::7] = -1                                   # padding entries are skipped
    k = torch.randn(50, 4, 128, device=device).to(dtype)
    v = torch.randn(50, 4, 128, device=device).to(dtype)
    got, want = kv.clone(), kv.clone()
    impl.write_kv(k, v, got, slots.to(torch.int32))
    reference.write_kv(k, v, want, slots)
    assert torch.equal(got, want)


def check_rms_norm(impl, device, dtype) -> None:
    for rows, hidden in [(1, 4096), (37, 3584), (5, 100)]:
        x = torch.randn(rows, hidden, device=device).to(dtype)
        res = torch.randn(rows, hidden, device=device).to(dtype)
        w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
        ref = reference.rms_norm(x.double(), w.double(), 1e-6)
        assert _rel(impl.rms_norm(x, w, 1e-6), ref) < TOL[dtype]
        out, res_out = impl.rms_norm(x, w, 1e-6, residual=res)
        ref_out, ref_res = reference.rms_norm(x, w, 1e-6, residual=res)   # same dtype as HF
        assert torch.equal(res_out, ref_res)
        assert _rel(out, reference.rms_norm(ref_res.double(), w.double(), 1e-6)) < TOL[dtype]


def check_silu_and_mul(impl, device, dtype) -> None:
    for rows, inter in [(1, 11008), (9, 18944), (3, 100)]:
        x = torch.randn(rows, 2 * inter, device=device).to(dtype)
        assert _rel(impl.silu_and_mul(x), reference.silu_and_mul(x.double())) < TOL[dtype]


@gpu
@needs_gpu
def test_decode_attention():
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for case in DECODE_CASES:
            check_decode(triton_impl, "cuda", dtype, *case)


@gpu
@needs_gpu
def test_decode_attention_forced_splits():
    for num_splits in (1, 3, 16, 64):
        check_decode(triton_impl, "cuda", torch.bfloat16, 2, 32, 8, 128, [3001, 700],
                     num_splits=num_splits)


@gpu
@needs_gpu
def test_decode_attention_cuda_graph():
    """Captured once, replayed with new queries and lengths (the runner's decode graphs)."""
    dtype, batch, lens = torch.bfloat16, 4, [900, 17, 2000, 1]
    kv, tables = _paged([2048] * batch, 8, 128, dtype, "cuda")
    q = torch.randn(batch, 32, 128, device="cuda", dtype=dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    call = lambda: triton_impl.paged_decode_attention(  # noqa: E731
        q, kv, tables, context_lens, 128 ** -0.5, max_context_len=2048, out=out)
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for new_lens in ([5, 2048, 33, 1000], [1, 1, 1, 0]):
        q.copy_(torch.randn_like(q))
        context_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        ref = reference.paged_decode_attention(q.double(), kv.double(), tables, context_lens,
                                               128 ** -0.5)
        assert _rel(out, ref) < TOL[dtype]


@gpu
@needs_gpu
def test_prefill_attention():
    for dtype in (torch.bfloat16, torch.float32):
        for case in PREFILL_CASES:
            check_prefill(triton_impl, "cuda", dtype, *case)


@gpu
@needs_gpu
def test_fresh_prefill_attention_flash():
    """Chunks with nothing cached before them: FlashAttention varlen (through torch) equals the
    float64 reference and the Triton kernel's tolerance, k/v as strided views of a fused qkv."""
    from mmhpc import kernels
    for dtype in (torch.bfloat16, torch.float16):
        for hq, hkv, d, lens in [(32, 32, 128, [617, 1, 40, 2048]), (28, 4, 128, [5, 1000]),
                                 (16, 16, 80, [300, 77])]:
            T = sum(lens)
            qkv = torch.randn(T, (hq + 2 * hkv) * d, device="cuda").to(dtype)
            q = qkv[:, :hq * d].view(T, hq, d)
            k = qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
            v = qkv[:, (hq + hkv) * d:].view(T, hkv, d)
            cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32,
                              device="cuda")
            out = kernels.fresh_prefill_attention(q, k, v, cu, max(lens), d ** -0.5)
            assert out is not None, kernels._flash_error
            kv, tables = _paged(lens, hkv, d, dtype, "cuda")    # the reference reads k/v here
            reference.write_kv(k, v, kv, _slot_mapping(tables, [(n, 0) for n in lens]))
            ref = reference.paged_prefill_attention(
                q.double(), k.double(), v.double(), cu, kv.double(), tables,
                torch.tensor(lens, dtype=torch.int32, device="cuda"), d ** -0.5)
            err = _rel(out, ref)
            assert err < TOL[dtype], (dtype, hq, hkv, d, lens, err)
    q32 = torch.randn(4, 2, 64, device="cuda")                   # fp32: the Triton kernel's
    cu = torch.tensor([0, 4], dtype=torch.int32, device="cuda")
    assert kernels.fresh_prefill_attention(q32, q32, q32, cu, 4, 0.125) is None


@gpu
@needs_gpu
def test_write_kv():
    for dtype in (torch.bfloat16, torch.float32):
        check_write_kv(triton_impl, "cuda", dtype)


@gpu
@needs_gpu
def test_rms_norm_and_silu():
    for dtype in (torch.bfloat16, torch.float32):
        check_rms_norm(triton_impl, "cuda", dtype)
        check_silu_and_mul(triton_impl, "cuda", dtype)


@gpu
@needs_gpu
def test_rotary_write_kv():
    """Fused rotary (q and k heads in place) + cache write vs float64 reference; padding slot;
    both a few heads a program (steps of <= 64 tokens) and all heads in one."""
    from mmhpc.kernels import fused
    for dtype in (torch.bfloat16, torch.float32):
        for T, Hq, Hkv, D in ((37, 32, 32, 128), (5, 28, 4, 128), (3, 16, 16, 80),
                              (1, 32, 32, 128), (130, 28, 4, 128)):
            qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device="cuda").to(dtype)
            ang = torch.randn(T, D // 2, device="cuda")
            cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
            nb = max(8, T // BLOCK_SIZE + 2)                # cache blocks: a slot for every token
            slots = torch.randperm(nb * BLOCK_SIZE, device="cuda")[:T]
            if T > 1:
                slots[1] = -1                           # a padding row: no write
            out = {}
            split = fused.ROTARY_DECODE_HEADS
            for name, impl, x_dtype, heads in (("split", fused, dtype, split),
                                               ("one", fused, dtype, None),   # all heads a program
                                               ("want", reference, torch.float64, split)):
                x = qkv.clone().to(x_dtype)         # the kernel works in place: own copies
                cache = torch.full((2, nb, Hkv, BLOCK_SIZE, D), float("nan"), device="cuda",
                                   dtype=x_dtype)
                qk = x[:, :(Hq + Hkv) * D].view(T, Hq + Hkv, D)
                v = x[:, (Hq + Hkv) * D:].view(T, Hkv, D)
                fused.ROTARY_DECODE_HEADS = heads
                try:
                    impl.rotary_write_kv(qk, Hq, v, cos.to(x_dtype), sin.to(x_dtype), cache, slots)
                finally:
                    fused.ROTARY_DECODE_HEADS = split
                out[name] = qk, cache
            want_qk, want_cache = out.pop("want")
            written = ~torch.isnan(want_cache)
            for got_qk, got_cache in out.values():
                assert _rel(got_qk, want_qk) < TOL[dtype]
                assert torch.equal(written, ~torch.isnan(got_cache))
                assert _rel(got_cache[written], want_cache[written]) < TOL[dtype]


@gpu
@needs_gpu
def test_add_layer_norm():
    """ViT residual add + LayerNorm (+ the next GEMM's bias pre-added) vs torch."""
    from mmhpc.kernels import fused
    for dtype in (torch.bfloat16, torch.float32):
        for rows, C in ((577 * 3, 1024), (100, 1280), (5, 80)):
            x, r = (torch.randn(rows, C, device="cuda").to(dtype) for _ in range(2))
            w, b, b2 = (torch.randn(C, device="cuda").to(dtype) for _ in range(3))
            out, h = fused.add_layer_norm(x, r, w, b, 1e-5)
            ref_h = x + r                                   # torch rounds the sum to dtype
            assert torch.equal(h, ref_h)
            ref = F.layer_norm(ref_h.double(), (C,), w.double(), b.double(), 1e-5)
            assert _rel(out, ref) < TOL[dtype]
            out2, hb = fused.add_layer_norm(x, r, w, b, 1e-5, next_bias=b2)
            assert torch.equal(out2, out)
            assert _rel(hb, ref_h.double() + b2.double()) < TOL[dtype]


@gpu
@needs_gpu
def test_qk_norm():
    """Qwen3's in-place per-head q/k RMSNorm over a qkv row's q+k heads vs float64, v untouched
    (Qwen3-VL-30B-A3B's 32 q / 4 kv heads of 128; a non-power-of-2 head count)."""
    from mmhpc.kernels import fused
    for dtype in (torch.bfloat16, torch.float32):
        for T, Hq, Hkv, D in ((1, 32, 4, 128), (7, 32, 4, 128), (5, 12, 3, 64)):
            qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device="cuda").to(dtype)
            qw, kw = (torch.rand(D, device="cuda").to(dtype) + 0.5 for _ in range(2))
            want = qkv.double().view(T, Hq + 2 * Hkv, D).clone()
            heads = want[:, :Hq + Hkv]
            heads *= torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-6)
            heads[:, :Hq] *= qw.double()
            heads[:, Hq:] *= kw.double()
            got = qkv.clone()
            fused.qk_norm_(got[:, :(Hq + Hkv) * D].view(T, Hq + Hkv, D), Hq, qw, kw, 1e-6)
            assert _rel(got, want.view(T, -1)) < TOL[dtype]
            assert torch.equal(got[:, (Hq + Hkv) * D:], qkv[:, (Hq + Hkv) * D:])


@gpu
@needs_gpu
def test_moe_decode():
    """A decode step's MoE experts (two GEMV-style kernels) vs float64 at Qwen3-VL-30B-A3B's
    sizes (128 experts of 768, top 8) and an odd small one, 1 and 4 tokens."""
    from mmhpc.kernels.moe_decode import moe_decode, reference
    for dtype in (torch.bfloat16, torch.float32):
        for E, H, I, k in ((128, 2048, 768, 8), (6, 200, 72, 3)):
            gu = (torch.randn(E, 2 * I, H, device="cuda") / H ** 0.5).to(dtype)
            down = (torch.randn(E, H, I, device="cuda") / I ** 0.5).to(dtype)
            for T in (1, 4):
                x = torch.randn(T, H, device="cuda").to(dtype)
                ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)])
                w = torch.softmax(torch.randn(T, k, device="cuda"), -1).to(dtype)
                want = reference(x.double(), gu.double(), down.double(), ids, w.double())
                assert _rel(moe_decode(x, gu, down, ids, w), want) < TOL[dtype]


@gpu
@needs_gpu
def test_gemv():
    """One-row linear (batch-1 decode) vs float64, with and without bias, K off the chunk."""
    import mmhpc.kernels as kernels
    from mmhpc.kernels import fused
    for dtype in (torch.bfloat16, torch.float32):
        for N, K, bias in ((12288, 4096, False), (4608, 3584, True), (4096, 11008, False),
                           (7, 3000, True), (33, 64, False), (5, 5000, True)):
            x = torch.randn(1, K, device="cuda").to(dtype)
            w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)
            b = torch.randn(N, device="cuda").to(dtype) if bias else None
            ref = F.linear(x.double(), w.double(), b.double() if bias else None)
            assert _rel(fused.gemv(x, w, b), ref) < TOL[dtype]
            assert _rel(fused.gemv(x, w, b, block_n=2, block_k=2048, num_warps=8, num_stages=3),
                        ref) < TOL[dtype]                           # the H100-tuned tiles
            assert _rel(kernels.linear(x, w, b), ref) < TOL[dtype]
            x2 = torch.randn(3, K, device="cuda").to(dtype)          # several rows: cuBLAS
            assert _rel(kernels.linear(x2, w, b), F.linear(x2.double(), w.double(),
                                                           b.double() if bias else None)) < TOL[dtype]


@gpu
@needs_gpu
def test_gemv_silu_and_mul():
    """The gated GEMV (gate_up projection + SiLU-mul in one launch) vs float64, and bit-equal to
    the GEMV followed by the SiLU-mul kernel (what it replaces) at the same tiles."""
    import mmhpc.kernels as kernels
    from mmhpc.kernels import fused
    for dtype in (torch.bfloat16, torch.float32):
        for inter, K in ((11008, 4096), (18944, 3584), (5, 3000), (48, 64)):
            x = torch.randn(1, K, device="cuda").to(dtype)
            w = (torch.randn(2 * inter, K, device="cuda") / K ** 0.5).to(dtype)
            ref = reference.silu_and_mul(F.linear(x.double(), w.double()))
            out = kernels.linear_silu_and_mul(x, w)
            assert out.shape == (1, inter)
            assert _rel(out, ref) < TOL[dtype]
            # same weight rows a program (one gate + one up row = two rows): same sums, bit for bit
            assert torch.equal(fused.gemv(x, w, gated=True, block_n=2),
                               triton_impl.silu_and_mul(fused.gemv(x, w, block_n=2)))
            x2 = torch.randn(3, K, device="cuda").to(dtype)          # several rows: cuBLAS
            assert _rel(kernels.linear_silu_and_mul(x2, w),
                        reference.silu_and_mul(F.linear(x2.double(), w.double()))) < TOL[dtype]


@gpu
@needs_gpu
def test_pdl_chain_in_graph():
    """A decode layer's kernel chain (RMSNorm, GEMV, rotary + KV write, paged attention, GEMV,
    gated GEMV), each reading the one before, replayed as a CUDA graph with programmatic
    dependent launch: bit-equal to the same graph captured without it, over many replays with
    inputs changed between them (a kernel reading before its predecessor's writes landed would
    show as a mismatch)."""
    import mmhpc.kernels as kernels
    from mmhpc.kernels import fused, pdl
    if not pdl._supported():
        pytest.skip("no PDL: needs compute capability 9.0 and Triton's griddepcontrol")
    torch.manual_seed(0)
    dt, C, Hq, Hkv, D, inter = torch.bfloat16, 1024, 8, 2, 128, 2816
    w_norm = torch.rand(C, device="cuda", dtype=dt) + 0.5
    w_qkv = (torch.randn((Hq + 2 * Hkv) * D, C, device="cuda") / C ** 0.5).to(dt)
    w_o = (torch.randn(C, Hq * D, device="cuda") / (Hq * D) ** 0.5).to(dt)
    w_gu = (torch.randn(2 * inter, C, device="cuda") / C ** 0.5).to(dt)
    w_down = (torch.randn(C, inter, device="cuda") / inter ** 0.5).to(dt)
    ctx = 300
    kv, tables = _paged([ctx], Hkv, D, dt, "cuda")
    lens = torch.tensor([ctx], device="cuda", dtype=torch.int32)
    slot = torch.tensor([int(tables[0, (ctx - 1) // BLOCK_SIZE]) * BLOCK_SIZE
                         + (ctx - 1) % BLOCK_SIZE], device="cuda")
    h_in = torch.randn(1, C, device="cuda", dtype=dt)
    cos = torch.rand(1, D, device="cuda", dtype=dt)
    sin = torch.rand(1, D, device="cuda", dtype=dt)

    def layer():
        x, res = kernels.rms_norm(h_in, w_norm, 1e-6, h_in)
        qkv = fused.gemv(x, w_qkv)
        qk = qkv[:, :(Hq + Hkv) * D].view(1, Hq + Hkv, D)
        v = qkv[:, (Hq + Hkv) * D:].view(1, Hkv, D)
        kernels.rotary_write_kv(qk, Hq, v, cos, sin, kv, slot)
        o = kernels.paged_decode_attention(qk[:, :Hq], kv, tables, lens, D ** -0.5,
                                           max_context_len=ctx)
        h = fused.gemv(o.reshape(1, Hq * D), w_o)
        x, res = kernels.rms_norm(h, w_norm, 1e-6, res)
        return fused.gemv(kernels.linear_silu_and_mul(x, w_gu), w_down) + res

    outs = {}
    try:
        for on in (False, True):
            pdl.set_enabled(on)
            layer()                                               # compile outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = layer()
            gen = torch.Generator(device="cuda").manual_seed(1)
            res = []
            for _ in range(50):
                h_in.copy_(torch.randn(1, C, device="cuda", generator=gen).to(dt))
                g.replay()
                res.append(out.clone())
            outs[on] = torch.cat(res)
    finally:
        pdl.set_enabled(None)
    assert torch.isfinite(outs[True]).all()
    assert torch.equal(outs[True], outs[False])


@gpu
@needs_gpu
def test_dispatch_picks_triton_on_cuda():
    import mmhpc.kernels as kernels
    assert kernels.HAS_TRITON
    check_decode(kernels, "cuda", torch.bfloat16, 2, 8, 2, 64, [40, 3])


def test_reference_matches_dense_sdpa():
    """The CPU path: paged reference == dense causal SDPA over the same keys."""
    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim = 8, 2, 32
    prior, chunk = 21, 13
    kv, tables = _paged([prior + chunk], num_kv_heads, head_dim, torch.float64, "cpu")
    q = torch.randn(chunk, num_heads, head_dim, dtype=torch.float64)
    k = torch.randn(chunk, num_kv_heads, head_dim, dtype=torch.float64)
    v = torch.randn(chunk, num_kv_heads, head_dim, dtype=torch.float64)
    slots = torch.tensor([int(tables[0, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE
                          for p in range(prior, prior + chunk)])
    reference.write_kv(k, v, kv, slots)
    out = reference.paged_prefill_attention(
        q, k, v, torch.tensor([0, chunk]), kv, tables, torch.tensor([prior + chunk]), 0.3)
    keys, values = reference.gather_kv(kv, tables[0], prior + chunk)          # [Hkv, n, D]
    keys = keys.repeat_interleave(num_heads // num_kv_heads, 0)
    values = values.repeat_interleave(num_heads // num_kv_heads, 0)
    allowed = torch.arange(prior + chunk)[None, :] <= torch.arange(prior, prior + chunk)[:, None]
    dense = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=allowed,
                                           scale=0.3).transpose(0, 1)
    torch.testing.assert_close(out, dense)
    last = reference.paged_decode_attention(q[-1:], kv, tables, torch.tensor([prior + chunk]), 0.3)
    torch.testing.assert_close(last, dense[-1:])

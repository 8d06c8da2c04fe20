"""Small fused Triton ops of the CUDA engine (owned beside H's `paged_attention.py`):
rotary embedding applied in place to the q and k heads of a fused qkv row, and quick-GELU in
place. Each replaces a chain of 5-10 elementwise launches that cost more than the math at
decode batch sizes. Plain-torch equivalents: `mmhpc.models.layers.apply_rotary` and
`x * sigmoid(1.702 x)`."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mmhpc.kernels import pdl


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_c, num_heads,
                   HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    # one program: one token, all `num_heads` heads (q and k heads of a qkv row)
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HALF
    mask = (offs_h[:, None] < num_heads) & d_mask[None, :]
    c1 = tl.load(cos_ptr + t * stride_c + offs_d, mask=d_mask).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_c + HALF + offs_d, mask=d_mask).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_c + offs_d, mask=d_mask).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_c + HALF + offs_d, mask=d_mask).to(tl.float32)
    base = x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(base, mask=mask).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask).to(tl.float32)
    y1 = x1 * c1[None, :] - x2 * s1[None, :]
    y2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(base, y1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + HALF, y2.to(x_ptr.dtype.element_ty), mask=mask)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place: x [T, H, D] (a view whose heads are evenly strided, e.g. the q+k heads of a
    qkv row); cos, sin [T, D] (rotate-half layout). Returns x."""
    T, H, D = x.shape
    assert x.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride(0) == sin.stride(0)
    if T:
        _rotary_kernel[(T,)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), H,
                             HALF=D // 2, BLOCK_D=triton.next_power_of_2(D // 2), BLOCK_H=triton.next_power_of_2(H), num_warps=4)
    return x


@triton.jit
def _qk_norm_kernel(x_ptr, qw_ptr, kw_ptr, stride_t, stride_h, num_q_heads, num_heads, eps,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    # one program: one token, BLOCK_H of its q+k heads (q heads first); RMSNorm over each
    # head in place, q heads by qw, k heads by kw, rounded as HF's (norm in x's dtype, times w)
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    mask = (offs_h[:, None] < num_heads) & d_mask[None, :]
    ptrs = x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = (x * inv[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    qw = tl.load(qw_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    kw = tl.load(kw_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    w = tl.where((offs_h < num_q_heads)[:, None], qw[None, :], kw[None, :])
    tl.store(ptrs, (w * y).to(x_ptr.dtype.element_ty), mask=mask)


def qk_norm_(qk: torch.Tensor, num_q_heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor,
             eps: float) -> torch.Tensor:
    """In place: Qwen3's QK-norm, an RMSNorm over each head of qk [T, Hq + Hkv, D] (a view
    whose heads are evenly strided: the q+k heads of a qkv row), q heads by q_weight, k heads
    by k_weight ([D] each). One launch for both. Returns qk."""
    T, H, D = qk.shape
    assert qk.stride(-1) == 1 and q_weight.is_contiguous() and k_weight.is_contiguous()
    if T:
        bh = min(16, triton.next_power_of_2(H))
        _qk_norm_kernel[(T, triton.cdiv(H, bh))](
            qk, q_weight, k_weight, qk.stride(0), qk.stride(1), num_q_heads, H, eps,
            D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_H=bh, num_warps=4)
    return qk


@triton.jit
def _quick_gelu_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = x / (1.0 + tl.exp(-1.702 * x))
    tl.store(x_ptr + offs, y.to(x_ptr.dtype.element_ty), mask=mask)


def quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    """In place x * sigmoid(1.702 x) on a contiguous tensor. Returns x."""
    assert x.is_contiguous()
    n = x.numel()
    if n:
        _quick_gelu_kernel[(triton.cdiv(n, 2048),)](x, n, BLOCK=2048, num_warps=8)
    return x


@triton.jit
def _rotary_write_kv_kernel(x_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
                            stride_t, stride_h, stride_vt, stride_vh, stride_c,
                            stride_cb, stride_ch, stride_ct, stride_vcb, stride_vch, stride_vct,
                            num_q_heads, num_heads,
                            HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr, USE_PDL: tl.constexpr):
    # one program: one token, BLOCK_H of its q+k heads (q heads first, then k heads); rotate
    # them in place and, for k heads of a token with a slot (>= 0), store the rotated k and the
    # matching v head into the paged cache. Every load is issued before the first store.
    t = tl.program_id(0).to(tl.int64)
    if USE_PDL:                             # mmhpc.kernels.pdl: wait, then let the next launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HALF
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < num_heads) & d_mask[None, :]
    slot = tl.load(slot_ptr + t).to(tl.int64)
    c1 = tl.load(cos_ptr + t * stride_c + offs_d, mask=d_mask).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_c + HALF + offs_d, mask=d_mask).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_c + offs_d, mask=d_mask).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_c + HALF + offs_d, mask=d_mask).to(tl.float32)
    base = x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(base, mask=mask).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask).to(tl.float32)
    kvh = tl.maximum(offs_h - num_q_heads, 0)           # k heads: their kv head
    kmask = mask & (offs_h >= num_q_heads)[:, None] & (slot >= 0)
    vb = v_ptr + t * stride_vt + kvh[:, None] * stride_vh + offs_d[None, :]
    v1 = tl.load(vb, mask=kmask)
    v2 = tl.load(vb + HALF, mask=kmask)
    y1 = (x1 * c1[None, :] - x2 * s1[None, :]).to(x_ptr.dtype.element_ty)
    y2 = (x2 * c2[None, :] + x1 * s2[None, :]).to(x_ptr.dtype.element_ty)
    tl.store(base, y1, mask=mask)
    tl.store(base + HALF, y2, mask=mask)
    blk = tl.maximum(slot, 0) // BLOCK_SIZE
    off = tl.maximum(slot, 0) % BLOCK_SIZE
    kc = kc_ptr + blk * stride_cb + kvh[:, None] * stride_ch + off * stride_ct + offs_d[None, :]
    tl.store(kc, y1.to(kc_ptr.dtype.element_ty), mask=kmask)
    tl.store(kc + HALF, y2.to(kc_ptr.dtype.element_ty), mask=kmask)
    vc = vc_ptr + blk * stride_vcb + kvh[:, None] * stride_vch + off * stride_vct + offs_d[None, :]
    tl.store(vc, v1.to(vc_ptr.dtype.element_ty), mask=kmask)
    tl.store(vc + HALF, v2.to(vc_ptr.dtype.element_ty), mask=kmask)


# Heads a program of `rotary_write_kv` for steps of at most _ROTARY_SPLIT_TOKENS tokens (decode):
# one program for all 64 heads of a LLaVA token left most of the GPU idle on one token's
# latency chain; None: all heads in one program at every step size (as before 2026-12-04).
ROTARY_DECODE_HEADS: int | None = 4
_ROTARY_SPLIT_TOKENS = 64


def rotary_write_kv(qk: torch.Tensor, num_q_heads: int, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, kv_cache_layer: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """qk [T, Hq + Hkv, D] (q heads then k heads, evenly strided, e.g. of a qkv row): rotary in
    place on all heads; then the rotated k heads and v [T, Hkv, D] go to the cache slots
    `slot_mapping` [T] (negative: no write). = `rotary_` + `write_kv` in one launch."""
    T, H, D = qk.shape
    assert qk.stride(-1) == 1 and v.stride(-1) == 1 and cos.stride(-1) == 1
    assert cos.stride(0) == sin.stride(0) and kv_cache_layer.stride(-1) == 1 and D % 2 == 0
    if T == 0:
        return
    kc, vc = kv_cache_layer[0], kv_cache_layer[1]
    block_h = triton.next_power_of_2(H)
    if ROTARY_DECODE_HEADS and T <= _ROTARY_SPLIT_TOKENS:
        block_h = min(block_h, ROTARY_DECODE_HEADS)
    _rotary_write_kv_kernel[(T, triton.cdiv(H, block_h))](
        qk, v, cos, sin, kc, vc, slot_mapping,
        qk.stride(0), qk.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        num_q_heads, H, HALF=D // 2, BLOCK_D=triton.next_power_of_2(D // 2), BLOCK_H=block_h,
        BLOCK_SIZE=kv_cache_layer.shape[3], num_warps=4 if block_h * D >= 2048 else 1,
        **pdl.launch_kwargs())


@triton.jit
def _add_layer_norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, bias2_ptr, out_ptr, res_out_ptr,
                           n_cols, eps, HAS_BIAS2: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + row * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    h = (x + r).to(x_ptr.dtype.element_ty)              # the residual stream, in x's dtype (HF)
    if HAS_BIAS2:                                       # pre-add the next GEMM's bias to it
        b2 = tl.load(bias2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_out_ptr + row * n_cols + offs,
                 (h.to(tl.float32) + b2).to(res_out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(res_out_ptr + row * n_cols + offs, h, mask=mask)
    hf = h.to(tl.float32)
    mean = tl.sum(hf, 0) / n_cols
    d = tl.where(mask, hf - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, 0) / n_cols + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + offs, (d * rstd * w + b).to(out_ptr.dtype.element_ty),
             mask=mask)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float, next_bias: torch.Tensor | None = None):
    """h = x + residual (rounded to x's dtype, as HF adds); returns (LayerNorm(h), h), or with
    `next_bias` (LayerNorm(h), h + next_bias): the residual with the bias of the GEMM that
    will add into it already in, so that GEMM can be `addmm(h + b, y, W.T)` (one pass less).
    x, residual: contiguous [..., C]."""
    assert x.is_contiguous() and residual.is_contiguous() and x.shape == residual.shape
    C = x.shape[-1]
    out = torch.empty_like(x)
    res_out = torch.empty_like(x)
    rows = x.numel() // C if C else 0
    if rows:
        _add_layer_norm_kernel[(rows,)](
            x, residual, weight, bias, next_bias if next_bias is not None else bias, out, res_out,
            C, eps, HAS_BIAS2=next_bias is not None, BLOCK=triton.next_power_of_2(C),
            num_warps=4 if C <= 2048 else 8)
    return out, res_out


@triton.jit
def _gemv_rows(x_ptr, w_ptr, rows, rmask, K, BK: tl.constexpr, USE_PDL: tl.constexpr):
    # sum_k w[rows, k] x[k] in fp32 (one value a row), K streamed in BK chunks. The first
    # weight chunk reads nothing an earlier kernel writes: it is in flight before the PDL wait.
    cols = tl.arange(0, BK)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * K
    w = tl.load(w_rows + cols[None, :], mask=rmask[:, None] & (cols < K)[None, :], other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * x[None, :]
    for k0 in range(BK, K, BK):
        c = k0 + cols
        cmask = c < K
        x = tl.load(x_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        acc += tl.load(w_rows + c[None, :], mask=rmask[:, None] & cmask[None, :],
                       other=0.0).to(tl.float32) * x[None, :]
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    return tl.sum(acc, axis=1)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, USE_PDL: tl.constexpr):
    # y[n] = sum_k w[n, k] x[k] (+ b[n]): BN rows per program, fp32 accumulation.
    # GATED: w is [gate; up] (2N rows) and y[n] = silu(gate[n]) * up[n], each product rounded
    # to y's dtype first (= silu_and_mul of the plain GEMV's output, bit for bit); the program
    # reads its BN gate rows and the same BN up rows.
    if GATED:
        offs = tl.arange(0, 2 * BN)                  # gate 0, up 0, gate 1, up 1, ...
        out = tl.program_id(0) * BN + offs // 2
        rmask = out < N
        y = _gemv_rows(x_ptr, w_ptr, out + (offs % 2) * N, rmask, K, BK, USE_PDL)
        g, u = tl.split(tl.reshape(y, (BN, 2)))
        g = g.to(y_ptr.dtype.element_ty).to(tl.float32)
        u = u.to(y_ptr.dtype.element_ty).to(tl.float32)
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        tl.store(y_ptr + rows, (g / (1.0 + tl.exp(-g)) * u).to(y_ptr.dtype.element_ty),
                 mask=rows < N)
    else:
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        rmask = rows < N
        y = _gemv_rows(x_ptr, w_ptr, rows, rmask, K, BK, USE_PDL)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


# Batch-1 GEMV tiles (rows a program, columns a chunk, warps, stages), from issue 8's GEMV
# sweeps (bench/gemv_exp.py, since removed; bench/RESULTS.md). H200, 2026-12-04: one row a
# program, 4 warps, all of K <= 4096 in one chunk (1,024-column chunks beyond) read 2-9 % faster than (2, 2048, 8, 3), which won the
# H100 sweep of 2026-11-25 over one-row tiles of <= 2,048 columns (4,096 was not tried there).
# An H100 keeps its own winner until it is swept again; other cards take the H200's tiles.
# MMHPC_GEMV_TILES="2,2048,8,3" sets one tile for every shape.
_TILES: tuple[int, int, int, int] | None = None
H100_TILES = (2, 2048, 8, 3)
_ON_H100: bool | None = None


def set_gemv_tiles(tiles: tuple[int, int, int, int] | None) -> None:
    """One (block_n, block_k, num_warps, num_stages) for every GEMV launched after this; None:
    the per-K default (MMHPC_GEMV_TILES is read again). Captured graphs keep their tiles."""
    global _TILES
    _TILES = tuple(tiles) if tiles is not None else None


def gemv_tiles(K: int) -> tuple[int, int, int, int]:
    """The default tiles of a GEMV over K columns on this process's card."""
    global _TILES, _ON_H100
    if _TILES is None and os.environ.get("MMHPC_GEMV_TILES"):
        env = os.environ["MMHPC_GEMV_TILES"]
        try:
            bn, bk, warps, stages = (int(v) for v in env.split(","))
        except ValueError:
            raise ValueError(f"MMHPC_GEMV_TILES={env!r}: want four integers "
                             "block_n,block_k,num_warps,num_stages, e.g. 2,2048,8,3") from None
        _TILES = (bn, bk, warps, stages)
    if _TILES is not None:
        return _TILES
    if _ON_H100 is None:
        _ON_H100 = torch.cuda.is_available() and "H100" in torch.cuda.get_device_name()
    if _ON_H100:
        return H100_TILES
    return (1, 4096, 4, 3) if K <= 4096 else (1, 1024, 4, 3)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         gated: bool = False, block_n: int | None = None, block_k: int | None = None,
         num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """F.linear for ONE row: x [1, K] (contiguous), weight [N, K] (row-major), bias [N] →
    [1, N] in x's dtype, fp32 accumulation. At batch 1 a decode step is this, weight-read bound;
    it reads 3.3-4.5 TB/s on an H200 where cuBLAS reads 2.5-4.0 (tiles: `gemv_tiles`, any
    argument given overrides its part; bench/RESULTS.md). gated=True: weight is [gate; up]
    ([2I, K], no bias) and the result is silu(gate) * up, [1, I] (the MLP's SiLU-mul folded
    in: one launch less a layer)."""
    bn, bk, warps, stages = gemv_tiles(weight.shape[1])
    block_n = bn if block_n is None else block_n
    block_k = bk if block_k is None else block_k
    num_warps = warps if num_warps is None else num_warps
    num_stages = stages if num_stages is None else num_stages
    N, K = weight.shape
    assert x.shape == (1, K) and x.is_contiguous() and weight.stride() == (K, 1)
    if gated:
        assert bias is None and N % 2 == 0
        N //= 2
        block_n = max(1, block_n // 2)          # BN gate + BN up rows a program (at least 2)
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else weight, y, N, K, HAS_BIAS=bias is not None,
        GATED=gated, BN=block_n, BK=min(block_k, triton.next_power_of_2(K)),
        num_warps=num_warps, num_stages=num_stages, **pdl.launch_kwargs())
    return y

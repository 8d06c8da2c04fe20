"""Triton kernels for the CUDA engine: paged decode attention (split-K, flash-decoding style),
paged causal prefill attention for variable-length chunks, the KV scatter, fused RMSNorm
(+ residual) and SiLU-and-mul. `reference.py` holds the same ops in plain torch.

KV cache of one layer: `[2, num_blocks, num_kv_heads, block_size, head_dim]` (head-major inside a
block; the last dim must be contiguous). Everything is graph-safe: no host syncs once
`max_context_len` / `max_seqlen_q` are passed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmhpc.kernels import pdl

_NEG = tl.constexpr(-1.0e30)   # finite "minus infinity" for running maxima: exp2(_NEG - _NEG) is defined
_LOG2E = 1.4426950408889634


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"   # tf32 = Triton's default, fp16/bf16 unaffected


@triton.jit
def _attend_tile(q, k, v, m_i, l_i, acc, mask, scale_log2, DOT_PRECISION: tl.constexpr,
                 MASKED: tl.constexpr):
    """One online-softmax step of a query tile over one key tile."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        qk = tl.where(mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_kv(k_base, v_base, bt_row, n, n_mask, offs_d, d_mask, stride_kb, stride_kt,
              stride_vb, stride_vt, BLOCK_SIZE: tl.constexpr):
    """K and V rows of key positions `n` (masked by `n_mask`) of one head, through the
    sequence's block table row."""
    page = tl.load(bt_row + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    within = n % BLOCK_SIZE
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_base + page[:, None] * stride_kb + within[:, None] * stride_kt
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + page[:, None] * stride_vb + within[:, None] * stride_vt
                + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    scale_log2, partition_size, num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bt, stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PER_SEQ: tl.constexpr, USE_PDL: tl.constexpr,
):
    # One program: one sequence, one KV head (all GROUP query heads that share it), one partition.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    if USE_PDL:                             # mmhpc.kernels.pdl: wait, then let the next launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    ctx = tl.load(lens_ptr + b)
    # This sequence's partition: ITS context split evenly over the grid's num_splits partitions
    # (BLOCK_N-aligned), not the host bound's. A graph sized for the model's longest context
    # then still spreads a short context over all programs instead of a few full ones.
    if PER_SEQ:
        part = tl.maximum(((ctx + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N
                          * BLOCK_N, BLOCK_N)
    else:                                   # the host bound's partition (before issue 8's fix)
        part = partition_size
    start = s * part
    end = tl.minimum(start + part, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < end
        k, v = _paged_kv(k_base, v_base, bt_row, n, n_mask, offs_d, d_mask, stride_kb,
                         stride_kt, stride_vb, stride_vt, BLOCK_SIZE)
        m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, n_mask[None, :], scale_log2,
                                     DOT_PRECISION, True)

    if SPLIT:
        # partials: acc [B, Hq, S, D] (unnormalised), ml [B, Hq, S, 2] (running max in log2 units, sum)
        row = (b * tl.num_programs(1) * GROUP + heads).to(tl.int64) * num_splits + s
        tl.store(part_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc,
                 mask=g_mask[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)
    else:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, num_heads, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MAX_SPLITS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    if USE_PDL:                             # mmhpc.kernels.pdl: wait, then let the next launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs_s = tl.arange(0, MAX_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    row = (b * num_heads + h).to(tl.int64) * num_splits + offs_s
    m = tl.load(part_ml_ptr + row * 2, mask=s_mask, other=_NEG)
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)
    l_tot = tl.sum(w * l, 0)
    acc = tl.load(part_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], mask=s_mask[:, None],
                  other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(l_tot > 0, l_tot, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d,
             o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _check_cache(q: torch.Tensor, kv_cache_layer: torch.Tensor) -> None:
    assert kv_cache_layer.dim() == 5 and kv_cache_layer.shape[0] == 2, kv_cache_layer.shape
    assert kv_cache_layer.stride(-1) == 1, "kv cache: head_dim must be contiguous"
    assert q.stride(-1) == 1, "q: head_dim must be contiguous"
    assert kv_cache_layer.dtype == q.dtype, (kv_cache_layer.dtype, q.dtype)
    assert q.shape[-1] == kv_cache_layer.shape[-1], "head_dim mismatch"
    assert q.shape[-2] % kv_cache_layer.shape[2] == 0, "num_heads must be a multiple of num_kv_heads"


def decode_num_splits(batch: int, num_kv_heads: int, max_context_len: int,
                      min_partition: int = 256, max_splits: int = 64) -> int:
    """Partitions per sequence: enough programs to fill the GPU (~4 waves of 132 SMs),
    none shorter than `min_partition` keys."""
    want = triton.cdiv(4 * 132, max(1, batch * num_kv_heads))
    return max(1, min(want, triton.cdiv(max(1, max_context_len), min_partition), max_splits))


def paged_decode_attention(q: torch.Tensor, kv_cache_layer: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           max_context_len: int | None = None, out: torch.Tensor | None = None,
                           num_splits: int | None = None, block_n: int = 64,
                           num_warps: int = 4, num_stages: int = 2,
                           per_seq_partition: bool = True) -> torch.Tensor:
    """q: [B, Hq, D]; kv_cache_layer: [2, num_blocks, Hkv, block_size, D] (same dtype as q);
    block_tables: [B, max_blocks] int32; context_lens: [B] int32 (keys incl. the new one; 0 = padding,
    gives zeros). max_context_len: a host bound on context_lens (defaults to the block table's
    capacity, which is graph-safe). It sets the number of partitions; each sequence then splits
    its own context evenly over them (so a graph captured for the longest context wastes no
    program on a short one)."""
    _check_cache(q, kv_cache_layer)
    batch, num_heads, head_dim = q.shape
    _, _, num_kv_heads, block_size, _ = kv_cache_layer.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = decode_num_splits(batch, num_kv_heads, max_context_len)
    block_d = triton.next_power_of_2(head_dim)
    partition = triton.cdiv(triton.cdiv(max(1, max_context_len), num_splits), block_n) * block_n
    num_splits = triton.cdiv(max(1, max_context_len), partition)
    k_cache, v_cache = kv_cache_layer[0], kv_cache_layer[1]
    split = num_splits > 1
    if split:
        part_acc = torch.empty(batch, num_heads, num_splits, block_d, device=q.device,
                               dtype=torch.float32)
        part_ml = torch.empty(batch, num_heads, num_splits, 2, device=q.device, dtype=torch.float32)
    else:
        part_acc = part_ml = out          # unused
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_acc, part_ml,
        scale * _LOG2E, partition, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=block_n, SPLIT=split,
        DOT_PRECISION=_dot_precision(q.dtype), PER_SEQ=per_seq_partition,
        num_warps=num_warps, num_stages=num_stages, **pdl.launch_kwargs(),
    )
    if split:
        _decode_reduce_kernel[(batch, num_heads)](
            part_acc, part_ml, out, num_heads, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d,
            MAX_SPLITS=max(2, triton.next_power_of_2(num_splits)), num_warps=4,
            **pdl.launch_kwargs(),
        )
    return out


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, bt_ptr, cu_ptr, lens_ptr, out_ptr, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kb, stride_kch, stride_kct,
    stride_vb, stride_vch, stride_vct,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_M queries of one sequence's chunk, one query head; the last (longest)
    # query tiles are launched first. Keys in three runs: the cached prefix (paged, masked at
    # its end), the chunk's keys before this tile (this step's k/v rows: no mask), the tile's
    # diagonal (causal mask).
    mt = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    m0 = mt * BLOCK_M
    if m0 < q_len:
        prior = tl.load(lens_ptr + b) - q_len
        kvh = (h // GROUP).to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        m_mask = offs_m < q_len
        d_mask = offs_d < HEAD_DIM
        tok = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], _NEG, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        kc_base = kc_ptr + kvh * stride_kch
        vc_base = vc_ptr + kvh * stride_vch
        bt_row = bt_ptr + b.to(tl.int64) * stride_bt
        for n0 in range(0, prior, BLOCK_N):                    # the cached prefix
            n = n0 + offs_n
            n_mask = n < prior
            k, v = _paged_kv(kc_base, vc_base, bt_row, n, n_mask, offs_d, d_mask, stride_kb,
                             stride_kct, stride_vb, stride_vct, BLOCK_SIZE)
            m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, n_mask[None, :], scale_log2,
                                         DOT_PRECISION, True)

        k_base = k_ptr + kvh * stride_kh + q_start.to(tl.int64) * stride_kt
        v_base = v_ptr + kvh * stride_vh + q_start.to(tl.int64) * stride_vt
        for j0 in range(0, m0, BLOCK_N):                       # chunk keys before the tile
            j = (j0 + offs_n).to(tl.int64)
            k = tl.load(k_base + j[:, None] * stride_kt + offs_d[None, :],
                        mask=d_mask[None, :], other=0.0)
            v = tl.load(v_base + j[:, None] * stride_vt + offs_d[None, :],
                        mask=d_mask[None, :], other=0.0)
            m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, None, scale_log2,
                                         DOT_PRECISION, False)
        for j0 in range(m0, tl.minimum(m0 + BLOCK_M, q_len), BLOCK_N):   # the diagonal
            j = j0 + offs_n
            j_mask = j < q_len
            kv_mask = j_mask[:, None] & d_mask[None, :]
            k = tl.load(k_base + j.to(tl.int64)[:, None] * stride_kt + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(v_base + j.to(tl.int64)[:, None] * stride_vt + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            causal = (j[None, :] <= offs_m[:, None]) & j_mask[None, :]
            m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, causal, scale_log2,
                                         DOT_PRECISION, True)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, kv_cache_layer: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                            max_seqlen_q: int | None = None,
                            out: torch.Tensor | None = None, block_m: int | None = None,
                            block_n: int | None = None, num_warps: int = 4,
                            num_stages: int | None = None) -> torch.Tensor:
    """Causal attention for variable-length chunks whose earlier tokens are already cached.
    q: [T, Hq, D]; k, v: [T, Hkv, D], this chunk's keys and values (rows may be strided, e.g.
    views of a fused qkv); cu_seqlens_q: [B+1] int32; context_lens: [B] int32, keys per
    sequence INCLUDING this chunk. The cached prefix (context_lens - chunk length) is read from
    the paged cache, the chunk's own keys from k/v (they must also be written to the cache,
    `write_kv`, for later steps). max_seqlen_q: host bound on the chunk lengths (computed with
    a device sync when omitted)."""
    _check_cache(q, kv_cache_layer)
    num_tokens, num_heads, head_dim = q.shape
    batch = context_lens.shape[0]
    _, _, num_kv_heads, block_size, _ = kv_cache_layer.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and q.stride(-1) == 1
    if out is None:
        out = torch.empty_like(q)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if batch else 0
    if num_tokens == 0 or max_seqlen_q == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    big = q.dtype == torch.float32 or block_d > 128
    # bf16, head_dim 128, 26 x 617 fresh tokens on an H100 (issue 8's pattn_tune sweep,
    # bench/RESULTS.md): (64, 32, 3 stages) 408 us; 4 stages 524; the previous kernel (all keys paged) 571
    bm, bn, stages = (32, 32, 2) if big else (64, 32, 3)
    block_m, block_n, num_stages = block_m or bm, block_n or bn, num_stages or stages
    assert block_m % block_n == 0, "block_n must divide block_m"
    k_cache, v_cache = kv_cache_layer[0], kv_cache_layer[1]
    grid = (triton.cdiv(max_seqlen_q, block_m), batch, num_heads)
    _prefill_kernel[grid](
        q, k, v, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, num_kv_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ch, stride_ct, stride_vcb, stride_vch, stride_vct,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < HEAD_DIM)
        t64 = t.to(tl.int64)
        k = tl.load(k_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        tl.store(kc_ptr + blk * stride_cb + offs_h[:, None] * stride_ch + off * stride_ct
                 + offs_d[None, :], k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + blk * stride_vcb + offs_h[:, None] * stride_vch + off * stride_vct
                 + offs_d[None, :], v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache_layer: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter k, v [T, Hkv, D] (head_dim contiguous) into the cache at slot_mapping [T]
    (int32/int64, slot = block * block_size + offset; negative = skip, e.g. graph padding)."""
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache_layer.stride(-1) == 1
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    kc, vc = kv_cache_layer[0], kv_cache_layer[1]
    _write_kv_kernel[(num_tokens,)](
        k, v, kc, vc, slot_mapping, num_kv_heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_SIZE=kv_cache_layer.shape[3],
        num_warps=4,
    )


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if USE_PDL:                             # mmhpc.kernels.pdl: wait, then let the next launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)   # HF adds in x's dtype
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, 0) / n_cols
    h = (h * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, (w.to(tl.float32) * h.to(tl.float32))
             .to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """x: [..., N] (last dim contiguous). Returns norm(x), or with residual (norm(x+res), x+res)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    assert x2.stride(-1) == 1
    out = torch.empty_like(x2)
    if residual is not None:
        r2 = residual.reshape(-1, shape[-1])
        res_out = torch.empty_like(x2)
    else:
        r2 = res_out = x2
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res_out, shape[-1], eps,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(shape[-1]),
            num_warps=8 if shape[-1] >= 4096 else 4, **pdl.launch_kwargs(),
        )
    if residual is not None:
        return out.view(shape), res_out.view(shape)
    return out.view(shape)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if USE_PDL:                             # mmhpc.kernels.pdl: wait, then let the next launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2*I] = [gate | up] (last dim contiguous) -> silu(gate) * up: [..., I]."""
    shape = x.shape
    inter = shape[-1] // 2
    x2 = x.reshape(-1, shape[-1])
    assert x2.stride(-1) == 1
    out = torch.empty(x2.shape[0], inter, device=x.device, dtype=x.dtype)
    block = min(1024, triton.next_power_of_2(inter))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, inter, x2.stride(0), out.stride(0), BLOCK=block, num_warps=4,
            **pdl.launch_kwargs())
    return out.view(*shape[:-1], inter)

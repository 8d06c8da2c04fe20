"""Plain-torch versions of the ops in `paged_attention.py`: the oracle for the Triton kernels and
the path on CPU. Same signatures and semantics. Attention is computed in at least float32
(float64 inputs stay float64) and cast back to the query's dtype.

KV cache of one layer: `[2, num_blocks, num_kv_heads, block_size, head_dim]` (head-major inside a
block). A token's slot is `block_id * block_size + offset`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def gather_kv(kv_cache_layer: torch.Tensor, block_table: torch.Tensor, num_tokens: int):
    """The first `num_tokens` keys and values of one sequence: two `[Hkv, num_tokens, D]`."""
    block_size = kv_cache_layer.shape[3]
    num_blocks = (num_tokens + block_size - 1) // block_size
    pages = block_table[:num_blocks].long()
    kv = kv_cache_layer[:, pages]                              # [2, nb, Hkv, bs, D]
    kv = kv.transpose(1, 2).flatten(2, 3)[:, :, :num_tokens]   # [2, Hkv, n, D]
    return kv[0], kv[1]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            num_prior: int) -> torch.Tensor:
    # q: [L, Hq, D]; k, v: [Hkv, n, D]; query i sits at position num_prior + i and sees keys <= it
    num_q, num_heads, head_dim = q.shape
    num_kv_heads, n = k.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    cdt = _compute_dtype(q.dtype)
    qg = q.to(cdt).permute(1, 0, 2).reshape(num_kv_heads, group * num_q, head_dim)
    scores = torch.bmm(qg, k.to(cdt).transpose(1, 2)) * scale          # [Hkv, G*L, n]
    scores = scores.view(num_kv_heads, group, num_q, n)
    if num_q > 1 or num_prior + num_q != n:
        pos = torch.arange(num_prior, num_prior + num_q, device=q.device)[:, None]
        allowed = torch.arange(n, device=q.device)[None, :] <= pos     # [L, n]
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1).view(num_kv_heads, group * num_q, n)
    out = torch.bmm(probs, v.to(cdt)).view(num_heads, num_q, head_dim)  # [Hq, L, D]
    return out.permute(1, 0, 2)


def paged_decode_attention(q: torch.Tensor, kv_cache_layer: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           max_context_len: int | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """One new query per sequence. q: [B, Hq, D]; block_tables: [B, max_blocks] int;
    context_lens: [B] (keys per sequence, the new token's included; 0 = padding row -> zeros)."""
    if out is None:
        out = torch.empty_like(q)
    lens = context_lens.tolist()
    for b, n in enumerate(lens):
        if n == 0:
            out[b] = 0
            continue
        k, v = gather_kv(kv_cache_layer, block_tables[b], n)
        out[b] = _attend(q[b:b + 1], k, v, scale, n - 1)[0].to(out.dtype)
    return out


def paged_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, kv_cache_layer: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                            max_seqlen_q: int | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of variable-length chunks over the paged cache. q: [T, Hq, D];
    cu_seqlens_q: [B+1]; context_lens: [B] total keys per sequence INCLUDING this chunk.
    The chunk's k/v ([T, Hkv, D]) must already be in the cache (`write_kv`); they are taken only
    so the CPU and GPU paths share one signature."""
    if out is None:
        out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for b, n in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        kb, vb = gather_kv(kv_cache_layer, block_tables[b], n)
        out[start:end] = _attend(q[start:end], kb, vb, scale, n - (end - start)).to(out.dtype)
    return out


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache_layer: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter k, v [T, Hkv, D] into the cache at slot_mapping [T] (negative slot = skip)."""
    block_size = kv_cache_layer.shape[3]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache_layer[0, blocks, :, offsets] = k[keep].to(kv_cache_layer.dtype)
    kv_cache_layer[1, blocks, :, offsets] = v[keep].to(kv_cache_layer.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """HF Llama/Qwen2 RMSNorm over the last dim. With `residual`, first h = x + residual (in x's
    dtype) and return (norm(h), h), the pre-norm fused add of a decoder layer."""
    if residual is not None:
        x = x + residual
        res_out = x
    dtype = x.dtype
    h = x.to(_compute_dtype(dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(dtype)
    return (y, res_out) if residual is not None else y


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2*I] = [gate | up] -> silu(gate) * up: [..., I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_write_kv(qk: torch.Tensor, num_q_heads: int, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, kv_cache_layer: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Rotary (rotate-half, in float32) in place on every head of qk [T, Hq + Hkv, D], then the
    rotated k heads and v [T, Hkv, D] into the cache at slot_mapping (negative = skip)."""
    x = qk.float()
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos.float()[:, None], sin.float()[:, None]
    half = x.shape[-1] // 2
    rot = torch.cat((x1 * c[..., :half] - x2 * s[..., :half],
                     x2 * c[..., half:] + x1 * s[..., half:]), dim=-1)
    qk.copy_(rot.to(qk.dtype))
    write_kv(qk[:, num_q_heads:], v, kv_cache_layer, slot_mapping)

"""Attention and fused small ops for the engine: Triton on CUDA, plain torch (`reference`) elsewhere.

Each function below picks the Triton kernel when its tensors are on CUDA and Triton imports (and
the shapes suit it), else the reference. Signatures and shapes: see `paged_attention.py`.
"""
from __future__ import annotations

import logging
import os

import torch

from mmhpc.kernels import reference

try:  # triton is absent on CPU-only machines
    from mmhpc.kernels import paged_attention as _triton
except ImportError:  # pragma: no cover - depends on the machine
    _triton = None

HAS_TRITON = _triton is not None

__all__ = ["HAS_TRITON", "paged_decode_attention", "paged_prefill_attention",
           "fresh_prefill_attention", "varlen_attention", "write_kv",
           "rotary_write_kv", "rms_norm", "silu_and_mul", "linear", "linear_silu_and_mul",
           "reference"]


def _on_gpu(t: torch.Tensor, head_dim: int | None = None) -> bool:
    # tl.dot needs K >= 16; head_dim <= 256 keeps the tiles in registers/shared memory
    return HAS_TRITON and t.is_cuda and (head_dim is None or 16 <= head_dim <= 256)


def paged_decode_attention(q, kv_cache_layer, block_tables, context_lens, scale,
                           max_context_len=None, out=None):
    impl = _triton if _on_gpu(q, q.shape[-1]) else reference
    return impl.paged_decode_attention(q, kv_cache_layer, block_tables, context_lens, scale,
                                       max_context_len=max_context_len, out=out)


def paged_prefill_attention(q, k, v, cu_seqlens_q, kv_cache_layer, block_tables, context_lens,
                            scale, max_seqlen_q=None, out=None):
    impl = _triton if _on_gpu(q, q.shape[-1]) else reference
    return impl.paged_prefill_attention(q, k, v, cu_seqlens_q, kv_cache_layer, block_tables,
                                        context_lens, scale, max_seqlen_q=max_seqlen_q, out=out)


_flash_error: str | None = None     # why torch's FlashAttention failed once: not tried again


def fresh_prefill_attention(q, k, v, cu_seqlens_q, max_seqlen_q, scale):
    """Causal attention of chunks that are their sequences' whole context (nothing cached
    before them): q [T, Hq, D], k/v [T, Hkv, D] (rows may be strided views of a fused qkv),
    cu_seqlens_q [B+1] int32 -> [T, Hq, D]. On CUDA in 16-bit floats: FlashAttention-2's
    varlen kernel through torch (about twice the Triton kernel's rate, bench/RESULTS.md);
    None elsewhere or when torch lacks it (the caller runs `paged_prefill_attention`)."""
    if os.environ.get("MMHPC_PREFILL_FLASH", "1") == "0":
        return None
    return varlen_attention(q, k, v, cu_seqlens_q, max_seqlen_q, scale, causal=True)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, causal):
    """Attention within each segment [cu[i], cu[i+1]) of the rows (causal or not): q [T, Hq, D],
    k/v [T, Hkv, D], cu_seqlens [B+1] int32 -> [T, Hq, D]. FlashAttention-2's varlen kernel
    through torch on CUDA in 16-bit floats; None elsewhere or when torch lacks it."""
    global _flash_error
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256) or _flash_error:
        return None
    try:
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, causal, False,
            scale=scale)[0]
    except (RuntimeError, AttributeError, TypeError) as e:   # e.g. a torch built without flash
        _flash_error = str(e).splitlines()[0]
        logging.getLogger(__name__).warning(
            "FlashAttention varlen unavailable (%s): fresh prefill chunks take the Triton "
            "kernel, ViT windows one SDPA each", _flash_error)
        return None


def write_kv(k, v, kv_cache_layer, slot_mapping):
    impl = _triton if _on_gpu(k) else reference
    return impl.write_kv(k, v, kv_cache_layer, slot_mapping)


def rotary_write_kv(qk, num_q_heads, v, cos, sin, kv_cache_layer, slot_mapping):
    if _on_gpu(qk):
        from mmhpc.kernels import fused
        return fused.rotary_write_kv(qk, num_q_heads, v, cos, sin, kv_cache_layer, slot_mapping)
    return reference.rotary_write_kv(qk, num_q_heads, v, cos, sin, kv_cache_layer, slot_mapping)


def linear(x, weight, bias=None):
    """F.linear; one row of a 16/32-bit float on CUDA takes the Triton GEMV (`fused.gemv`)."""
    if x.shape[0] == 1 and x.dim() == 2 and _on_gpu(x) and x.is_contiguous() \
            and weight.is_contiguous():
        from mmhpc.kernels import fused
        return fused.gemv(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def linear_silu_and_mul(x, weight):
    """silu_and_mul(F.linear(x, weight)) for weight = [gate; up] ([2I, K]); one row of a 16/32-bit
    float on CUDA is one GEMV launch with the SiLU-mul in its epilogue (`fused.gemv(gated=True)`,
    bit-equal to the two launches)."""
    if x.shape[0] == 1 and x.dim() == 2 and _on_gpu(x) and x.is_contiguous() \
            and weight.is_contiguous():
        from mmhpc.kernels import fused
        return fused.gemv(x, weight, gated=True)
    return silu_and_mul(torch.nn.functional.linear(x, weight))


def rms_norm(x, weight, eps, residual=None):
    impl = _triton if _on_gpu(x) else reference
    return impl.rms_norm(x, weight, eps, residual)


def silu_and_mul(x):
    impl = _triton if _on_gpu(x) else reference
    return impl.silu_and_mul(x)

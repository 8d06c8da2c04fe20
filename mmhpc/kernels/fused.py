"""Small fused Triton ops of the CUDA engine (owned beside H's `paged_attention.py`):
rotary embedding applied in place to the q and k heads of a fused qkv row, and quick-GELU in
place. Each replaces a chain of 5-10 elementwise launches that cost more than the math at
decode batch sizes. Plain-torch equivalents: `mmhpc.models.layers.apply_rotary` and
`x * sigmoid(1.702 x)`."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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

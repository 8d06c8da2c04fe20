"""A decode step's MoE experts (a few tokens, top-k each) as two GEMV-style Triton kernels that
read each chosen expert's weights in place: no sort, no grouped-GEMM set-up, two launches a
layer instead of a dozen (`models.moe` sorts the (token, expert) pairs and runs two grouped
GEMMs: right for many tokens, all overhead at one).

    a[p]  = silu(gate_up[e_p][:I] @ x[t_p]) * (gate_up[e_p][I:] @ x[t_p])    p = t * k + s
    y[t]  = sum_s w[t, s] * (down[e_{t,s}] @ a[t * k + s])

`moe_decode(x, gate_up, down, ids, weights)`: x [T, H], gate_up [E, 2I, H], down [E, H, I]
(models.moe.FusedExperts, one rank holding every expert), ids / weights [T, k] → [T, H].
`reference` is the same in torch (CPU, and the GPU check of the kernels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:                    # CPU-only installs: the reference only
    triton = None


def reference(x, gate_up, down, ids, weights) -> torch.Tensor:
    """The kernels' result by gathered weights and batched matmuls: [T, H] in x's dtype."""
    T, k = ids.shape
    rows = torch.arange(T * k, device=x.device) // k
    e = ids.flatten()
    g, u = torch.bmm(gate_up[e], x[rows, :, None]).squeeze(-1).chunk(2, dim=-1)    # [P, I]
    a = (F.silu(g.float()) * u.float()).to(x.dtype)
    y = torch.bmm(down[e], a[:, :, None]).squeeze(-1).float()                      # [P, H]
    return (y.view(T, k, -1) * weights.float()[:, :, None]).sum(1).to(x.dtype)


if triton is not None:
    from mmhpc.kernels.fused import _gemv_rows     # fp32 dot of weight rows with one vector

    @triton.jit
    def _gate_up_kernel(x_ptr, w_ptr, ids_ptr, a_ptr, I, H, stride_we,
                        TOP_K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # one program: one (token, expert) pair p, BN of the expert's I gate rows and the same
        # BN up rows; a[p, rows] = silu(gate) * up
        p = tl.program_id(0).to(tl.int64)
        e = tl.load(ids_ptr + p).to(tl.int64)
        x = x_ptr + (p // TOP_K) * H
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        rmask = rows < I
        g = _gemv_rows(x, w_ptr + e * stride_we, rows, rmask, H, BK, False)
        u = _gemv_rows(x, w_ptr + e * stride_we, rows + I, rmask, H, BK, False)
        tl.store(a_ptr + p * I + rows, (g / (1.0 + tl.exp(-g)) * u).to(a_ptr.dtype.element_ty),
                 mask=rmask)

    @triton.jit
    def _down_kernel(a_ptr, w_ptr, ids_ptr, wt_ptr, y_ptr, H, I, stride_we,
                     TOP_K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # one program: one token t, BN of the H output rows, summed over its TOP_K experts
        t = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        rmask = rows < H
        acc = tl.zeros((BN,), dtype=tl.float32)
        for s in tl.static_range(TOP_K):
            p = t * TOP_K + s
            e = tl.load(ids_ptr + p).to(tl.int64)
            wt = tl.load(wt_ptr + p).to(tl.float32)
            acc += wt * _gemv_rows(a_ptr + p * I, w_ptr + e * stride_we, rows, rmask, I, BK,
                                   False)
        tl.store(y_ptr + t * H + rows, acc.to(y_ptr.dtype.element_ty), mask=rmask)


def moe_decode(x, gate_up, down, ids, weights, block_n: int = 4, block_k: int = 1024,
               num_warps: int = 4) -> torch.Tensor:
    """x [T, H] (contiguous), gate_up [E, 2I, H], down [E, H, I] (contiguous), ids [T, k]
    (int), weights [T, k] → [T, H] in x's dtype. CUDA: the two kernels; else `reference`."""
    if triton is None or not x.is_cuda:
        return reference(x, gate_up, down, ids, weights)
    T, H = x.shape
    k, I = ids.shape[1], down.shape[2]
    assert x.is_contiguous() and gate_up.is_contiguous() and down.is_contiguous()
    ids, weights = ids.contiguous(), weights.contiguous()
    a = torch.empty(T * k, I, device=x.device, dtype=x.dtype)
    _gate_up_kernel[(T * k, triton.cdiv(I, block_n))](
        x, gate_up, ids, a, I, H, gate_up.stride(0), TOP_K=k, BN=block_n,
        BK=min(block_k, triton.next_power_of_2(H)), num_warps=num_warps)
    y = torch.empty_like(x)
    _down_kernel[(T, triton.cdiv(H, block_n))](
        a, down, ids, weights, y, H, I, down.stride(0), TOP_K=k, BN=block_n,
        BK=min(block_k, triton.next_power_of_2(I)), num_warps=num_warps)
    return y

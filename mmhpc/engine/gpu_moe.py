"""The MoE MLP of the CUDA path (`gpu_forward.FastDecoder`): softmax router, top-k renormalised,
then the (token, expert) pairs sorted by expert and two grouped GEMMs over the experts'
weights in place (`torch._grouped_mm`; CUTLASS on sm90, a CPU kernel in torch >= 2.9). No
host sync, so a decode step with MoE layers is captured in a CUDA graph like a dense one.

Works on the parameters of `models.qwen3_moe_block.SparseMoeBlock` (gate [E, H], experts'
gate_up [E_local, 2I, H] and down [E_local, H, I]; `first`/`num_local`: this rank's experts);
pairs routed to another rank's experts go to an empty tail group and are masked out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmhpc import kernels


def moe_forward(block, x: torch.Tensor) -> torch.Tensor:
    """x: [T, H] → [T, H] (summed over the instance's ranks when the experts are split)."""
    T, k, L = x.shape[0], block.top_k, block.num_local
    probs = torch.softmax(F.linear(x, block.gate.weight), dim=-1, dtype=torch.float32)  # [T, E]
    weights, experts = probs.topk(k, dim=-1)                                            # [T, k]
    weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype).flatten()            # [T k]
    local = (experts - block.first).flatten()                                           # [T k]
    mine = (local >= 0) & (local < L)
    local = torch.where(mine, local, L)                   # another rank's: the tail, no group
    order = torch.argsort(local, stable=True)             # pairs grouped by expert
    counts = torch.zeros(L + 1, dtype=torch.int32, device=x.device).index_add_(
        0, local, torch.ones_like(local, dtype=torch.int32))    # (bincount syncs on CUDA)
    offs = counts[:L].cumsum(0, dtype=torch.int32)                                  # [L] ends
    xs = x.index_select(0, order // k)                                                  # [Tk, H]
    gate_up = torch._grouped_mm(xs, block.experts.gate_up_proj.transpose(1, 2), offs=offs)
    y = torch._grouped_mm(kernels.silu_and_mul(gate_up), block.experts.down_proj.transpose(1, 2),
                          offs=offs)                                                    # [Tk, H]
    y = y * weights[order, None]
    if block.split:                                       # rows past offs[-1] are not written
        y = torch.where(mine[order, None], y, 0)
    out = torch.empty_like(y).index_copy_(0, order, y)    # back to (token, slot) order
    out = out.view(T, k, -1).float().sum(1).to(x.dtype)                                 # [T, H]
    return block.tp.all_reduce(out) if block.split else out

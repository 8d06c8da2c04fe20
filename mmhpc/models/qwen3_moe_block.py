"""Qwen3(-VL)-MoE sparse MLP: top-k of a softmax router, renormalised; SiLU-gated experts.

A stand-in until the generic MoE layer (`mmhpc.models.moe`, the Llama-4 issue's) lands: same
parameter names as HF (`gate.weight` [E, hidden], `experts.gate_up_proj` [E, 2I, hidden],
`experts.down_proj` [E, hidden, I]; the released checkpoints' [E, hidden, 2I] / [E, I, hidden]
are transposed on load), so swapping it costs only the import in qwen3_vl.py.

Parallelism: whole experts are split over the instance's ranks (expert r * E/n .. belongs to
rank r; the loader reads only those rows); every rank routes every token, runs its own experts
and the partial outputs are summed by one all-reduce. With n = 1 it is the plain layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmhpc.distributed.group import get_tp
from mmhpc.distributed.parallel import Shard


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tp = get_tp()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        n = self.tp.size if E % self.tp.size == 0 else 1       # ranks sharing the experts
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.first = self.tp.rank * (E // n) if n > 1 else 0   # this rank's first expert
        self.num_local = E // n
        self.split = n > 1
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.empty(self.num_local, 2 * I, H))
        self.experts.down_proj = nn.Parameter(torch.empty(self.num_local, H, I))
        for p in (self.experts.gate_up_proj, self.experts.down_proj):
            p.may_be_transposed = True          # HF 5.x saves [E, out, in]; releases [E, in, out]
            if self.split:
                p.tp_shard = Shard(0, self.tp.rank, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H]
        probs = F.softmax(F.linear(x, self.gate.weight), dim=-1, dtype=torch.float32)  # [T, E]
        weights, experts = probs.topk(self.top_k, dim=-1)                               # [T, k]
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        local = experts - self.first                                                    # [T, k]
        mine = (local >= 0) & (local < self.num_local)
        out = torch.zeros_like(x)
        if mine.any():
            tok, slot = mine.nonzero(as_tuple=True)                                     # [N]
            e = local[tok, slot]
            order = torch.argsort(e, stable=True)
            tok, slot, e = tok[order], slot[order], e[order]
            counts = torch.bincount(e, minlength=self.num_local).tolist()
            start = 0
            for j, n in enumerate(counts):                     # one GEMM pair per hit expert
                if n == 0:
                    continue
                t, s = tok[start:start + n], slot[start:start + n]
                gate, up = F.linear(x[t], self.experts.gate_up_proj[j]).chunk(2, dim=-1)
                y = F.linear(F.silu(gate) * up, self.experts.down_proj[j])             # [n, H]
                out.index_add_(0, t, y * weights[t, s, None])
                start += n
        return self.tp.all_reduce(out) if self.split else out

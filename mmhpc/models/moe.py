"""Mixture-of-experts layer: a router, fused experts, an optional shared expert, and expert
parallelism inside a TP instance.

Construction (`MoE(spec, router_name="router")`), the family picks the names its checkpoint
uses so that `loader.load_weights` maps them without rules:

    spec = MoESpec(hidden_size, intermediate_size, num_experts, top_k,
                   scoring="sigmoid"|"softmax", renormalize, weight_on_input,
                   shared_intermediate_size, hidden_act, layout="in_out"|"out_in")
    moe.<router_name>   nn.Linear(H, E, bias=False)            replicated
    moe.experts.gate_up_proj  [E_local, 2 * I_local, H]         gate rows first, then up rows
    moe.experts.down_proj     [E_local, H, I_local]
    moe.shared_expert   layers.MLP (gate/up/down_proj), TP-split over the instance, if any

Routing variants (`MoESpec`):
- Llama-4: `scoring="sigmoid", weight_on_input=True`: top-k over the router logits, sigmoid of
  the chosen logits, and the score multiplies the expert's INPUT (HF `Llama4TextMoe`); plus a
  shared expert (`shared_intermediate_size`).
- Qwen3-MoE: `scoring="softmax", renormalize=norm_topk_prob`: softmax over all experts in
  float32, top-k, renormalised; the weight multiplies the expert's output.

Weight loading: checkpoints store each layer's experts fused, in one of two layouts
(`spec.layout`): "in_out" (Llama-4: gate_up_proj [E, H, 2I], down_proj [E, I, H]) or "out_in"
(transformers 5.x in-memory Qwen3-MoE: gate_up_proj [E, 2I, H], down_proj [E, H, I]); "auto"
reads each tensor's layout from its shape (Qwen3-VL-MoE: the releases are in_out, HF 5.x
saves out_in; where the shape cannot tell, out_in). The
expert parameters carry a `weight_loader(slice_)` that reads only this rank's experts and its
TP part of each (safetensors `get_slice`), so a rank never reads another rank's experts.
Per-expert checkpoints (Qwen3-MoE as saved by transformers: `experts.{e}.gate_proj.weight`
[I, H], `up_proj` [I, H], `down_proj` [H, I]) load through `FusedExperts.load_expert`, which
`loader.load_weights` calls for such keys (experts of other ranks are skipped unread).

Parallelism (`get_tp()`: the instance's `tp` ranks and its `ep`, TensorRT-LLM's
moe_expert_parallel_size): rank r is in expert group `r // (tp / ep)` and owns experts
[g * E / ep, (g + 1) * E / ep), each TP-split `tp / ep` ways on the intermediate dim (rank
`r % (tp / ep)` of the group). With ep == 1 every rank computes every token over its part of
each expert and one all-reduce sums them (as a row-parallel MLP). With ep > 1 the tokens (the
same on every rank after attention) are split over the ranks; each rank routes its share and
sends each (token, expert) pair to the ranks of the expert's group by all-to-all; they
return partial outputs by the reverse all-to-all; the shares are all-gathered.

The expert compute sorts the (token, expert) pairs by expert and runs two grouped matmuls
(`torch._grouped_mm` where the shapes allow it, on CPU and CUDA; one matmul per expert
otherwise): no host sync, so a decode step with ep == 1 captures into a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from mmhpc.distributed.group import get_tp

SCORINGS = ("softmax", "sigmoid")
LAYOUTS = ("in_out", "out_in", "auto")


@dataclass(frozen=True)
class MoESpec:
    hidden_size: int
    intermediate_size: int             # per expert
    num_experts: int
    top_k: int
    scoring: str = "softmax"           # "softmax" | "sigmoid"
    renormalize: bool = False          # top-k weights divided by their sum (softmax)
    weight_on_input: bool = False      # Llama-4: the score scales the expert's input
    shared_intermediate_size: int = 0  # 0: no shared expert
    hidden_act: str = "silu"
    layout: str = "out_in"             # the checkpoint's fused expert tensors (see above)

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"MoE scoring {self.scoring!r} not implemented; known: {SCORINGS}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"MoE checkpoint layout {self.layout!r}; known: {LAYOUTS}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, {self.num_experts}]")


def route(logits: torch.Tensor, spec: MoESpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (weights [N, k] in the logits' dtype, expert ids [N, k])."""
    if spec.scoring == "sigmoid":                      # Llama-4: top-k first, then sigmoid
        top, ids = torch.topk(logits, spec.top_k, dim=-1)
        weights = torch.sigmoid(top.float())
    else:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, spec.top_k, dim=-1)
        if spec.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


def _grouped_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    align = 16 // x.element_size()
    return (hasattr(torch, "_grouped_mm") and x.shape[-1] % align == 0 and w.shape[1] % align == 0
            and (x.device.type == "cpu" or x.dtype == torch.bfloat16))


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [P, K] sorted by group, w [G, N, K], offs [G] int32 (cumulative row ends) -> [P, N]:
    rows [offs[g-1], offs[g]) times w[g].T."""
    if _grouped_ok(x, w):
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[1])
    ends = offs.tolist()                               # fallback: one matmul per group
    for g, (a, b) in enumerate(zip([0] + ends[:-1], ends)):
        if b > a:
            out[a:b] = x[a:b] @ w[g].T
    return out


def _count(ids: torch.Tensor, n: int) -> torch.Tensor:
    """[n] occurrences of each id (a bincount of fixed size: no host sync, graph-capturable)."""
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(
        0, ids, torch.ones_like(ids, dtype=torch.long))


class FusedExperts(nn.Module):
    """This rank's experts: gate_up_proj [E_local, 2 * I_local, H], down_proj [E_local, H, I_local]."""

    def __init__(self, spec: MoESpec, first: int, num_local: int, part: int, num_parts: int):
        super().__init__()
        if spec.intermediate_size % num_parts:
            raise ValueError(f"tp/ep={num_parts} must divide the experts' intermediate size "
                             f"({spec.intermediate_size})")
        inter = spec.intermediate_size // num_parts
        self.spec, self.first, self.num_local = spec, first, num_local
        self.part, self.num_parts, self.inter = part, num_parts, inter
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * inter, spec.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_local, spec.hidden_size, inter))
        self.gate_up_proj.weight_loader = self._load_gate_up
        self.down_proj.weight_loader = self._load_down
        self.gate_up_proj.load_expert = self.down_proj.load_expert = self.load_expert
        from mmhpc.models.layers import _act
        self.act = _act(spec.hidden_act)

    # ---- loading: this rank's experts and its part of their intermediate dim only -----------
    def _in_out(self, slice_, rows: int, cols: int) -> bool:
        """Whether this tensor is stored in_out, [E, rows, cols] (else [E, cols, rows])."""
        if self.spec.layout != "auto":
            return self.spec.layout == "in_out"
        return list(slice_.get_shape()[1:]) == [rows, cols] and rows != cols

    def _load_gate_up(self, slice_) -> torch.Tensor:   # fused checkpoint tensors
        e0, e1 = self.first, self.first + self.num_local
        full, a = self.spec.intermediate_size, self.part * self.inter
        b = a + self.inter
        if self._in_out(slice_, self.spec.hidden_size, 2 * full):    # [E, H, 2I]
            t = torch.cat([slice_[e0:e1, :, a:b], slice_[e0:e1, :, full + a:full + b]], dim=2)
            return t.transpose(1, 2).contiguous()
        return torch.cat([slice_[e0:e1, a:b, :], slice_[e0:e1, full + a:full + b, :]], dim=1)

    def _load_down(self, slice_) -> torch.Tensor:
        e0, e1 = self.first, self.first + self.num_local
        a, b = self.part * self.inter, (self.part + 1) * self.inter
        if self._in_out(slice_, self.spec.intermediate_size, self.spec.hidden_size):  # [E, I, H]
            return slice_[e0:e1, a:b, :].transpose(1, 2).contiguous()
        return slice_[e0:e1, :, a:b]

    def load_expert(self, expert: int, proj: str, slice_) -> int:
        """One expert's `gate_proj` / `up_proj` [I, H] or `down_proj` [H, I] checkpoint tensor
        (per-expert checkpoints) into this rank's part, if it owns the expert; bytes read."""
        e = expert - self.first
        if not 0 <= e < self.num_local:
            return 0
        a, b = self.part * self.inter, (self.part + 1) * self.inter
        with torch.no_grad():
            if proj == "down_proj":
                t = slice_[:, a:b]
                self.down_proj[e].copy_(t)
            else:
                t = slice_[a:b, :]
                off = 0 if proj == "gate_proj" else self.inter
                self.gate_up_proj[e, off:off + self.inter].copy_(t)
        return t.numel() * t.element_size()

    def forward(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """x [P, H] (one row per (token, expert) pair), expert [P] local ids -> [P, H]."""
        order = torch.argsort(expert, stable=True)                      # [P]
        counts = _count(expert, self.num_local)                          # [E_local]
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x.index_select(0, order)
        gate, up = grouped_linear(xs, self.gate_up_proj, offs).chunk(2, dim=-1)   # [P, I] each
        ys = grouped_linear(self.act(gate) * up, self.down_proj, offs)           # [P, H]
        return torch.empty_like(ys).index_copy_(0, order, ys)


class MoE(nn.Module):
    """Router + fused experts (+ shared expert). forward(x [T, H]) -> [T, H], the same on
    every rank of the instance. `tokens_per_expert` [E] counts the (token, expert) pairs
    routed to each expert (the same on every rank): an imbalance shows on /metrics."""

    def __init__(self, spec: MoESpec, router_name: str = "router"):
        super().__init__()
        tp = get_tp()
        ep = getattr(tp, "ep", 1)
        if tp.size % ep or spec.num_experts % ep:
            raise ValueError(f"ep={ep} must divide tp={tp.size} and the number of experts "
                             f"({spec.num_experts})")
        self.spec, self.tp, self.ep = spec, tp, ep
        self.num_parts = tp.size // ep                   # TP ways inside an expert group
        group, part = tp.rank // self.num_parts, tp.rank % self.num_parts
        num_local = spec.num_experts // ep
        self.router_name = router_name
        setattr(self, router_name, nn.Linear(spec.hidden_size, spec.num_experts, bias=False))
        self.experts = FusedExperts(spec, group * num_local, num_local, part, self.num_parts)
        self.shared_expert = None
        if spec.shared_intermediate_size:
            from mmhpc.models.layers import MLP
            self.shared_expert = MLP(SimpleNamespace(
                hidden_size=spec.hidden_size, intermediate_size=spec.shared_intermediate_size,
                hidden_act=spec.hidden_act), reduce=False)
        self.register_buffer("tokens_per_expert", torch.zeros(spec.num_experts, dtype=torch.long),
                             persistent=False)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.router_name)(x)                      # [T, E]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # every rank routes every token (the router is small): the counts agree on all ranks
        weights, ids = route(self.router_logits(x), self.spec)                 # [T, k], [T, k]
        self.tokens_per_expert += _count(ids.flatten(), self.spec.num_experts)
        if self.ep > 1:
            out = self._expert_parallel(x, weights, ids)
            if self.shared_expert is not None:
                out = out + self.tp.all_reduce(self.shared_expert(x))
            return out
        k = self.spec.top_k
        rows = torch.arange(x.shape[0] * k, device=x.device) // k       # [T * k] (no host sync)
        y = self._compute(x.index_select(0, rows), ids.flatten(), weights.flatten())
        out = torch.zeros_like(x).index_add_(0, rows, y)                # partial over parts
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return self.tp.all_reduce(out)

    def _compute(self, xs: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Pairs xs [P, H] to global experts ids [P] with weights [P] -> weighted outputs."""
        w = weights[:, None].to(xs.dtype)
        if self.spec.weight_on_input:
            return self.experts(xs * w, ids - self.experts.first)
        return self.experts(xs, ids - self.experts.first) * w

    def _expert_parallel(self, x: torch.Tensor, weights: torch.Tensor,
                         ids: torch.Tensor) -> torch.Tensor:
        """ep > 1: this rank takes its share of the tokens; each (token, expert) pair travels
        to the ranks of its expert's group and back by all-to-all; the shares are gathered."""
        T, H = x.shape
        size, rank, parts, k = self.tp.size, self.tp.rank, self.num_parts, self.spec.top_k
        share = -(-T // size)
        lo, hi = min(T, rank * share), min(T, (rank + 1) * share)
        mine = x[lo:hi]                                                  # [n, H]
        ids, weights = ids[lo:hi].flatten(), weights[lo:hi].flatten()  # [n * k]
        rows = torch.arange((hi - lo) * k, device=x.device) // k
        # each pair goes to every rank of its expert's group: parts * n * k sends
        group = ids // self.experts.num_local
        dest = (group[None, :] * parts + torch.arange(parts, device=x.device)[:, None]).flatten()
        pair = torch.arange(len(ids), device=x.device).repeat(parts)
        order = torch.argsort(dest, stable=True)
        dest, pair = dest[order], pair[order]
        w = weights.index_select(0, pair)[:, None].to(x.dtype)
        payload = mine.index_select(0, rows.index_select(0, pair))     # [S, H]
        if self.spec.weight_on_input:
            payload = payload * w
        send_counts = _count(dest, size)
        recv_counts = self.tp.all_to_all(send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        recv_x = self.tp.all_to_all(payload, recv, send)               # [R, H]
        recv_ids = self.tp.all_to_all(ids.index_select(0, pair), recv, send)
        y = self.experts(recv_x, recv_ids - self.experts.first) if sum(recv) else recv_x
        back = self.tp.all_to_all(y, send, recv)                        # [S, H] partials
        if not self.spec.weight_on_input:
            back = back * w
        routed = torch.zeros_like(mine).index_add_(0, rows.index_select(0, pair), back)
        return self.tp.all_gather_rows(routed, T)                       # [T, H]


def moe_layers(model: nn.Module) -> list[MoE]:
    """The model's MoE layers (their `tokens_per_expert` summed: the /metrics counts)."""
    return [m for m in model.modules() if isinstance(m, MoE)]

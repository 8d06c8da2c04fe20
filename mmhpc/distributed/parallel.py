"""Tensor-parallel layers (Megatron style), built for the current TP group (`get_tp()`).

Each sharded parameter carries `tp_shard = Shard(dim, index, count)`: the loader reads only
that part of the checkpoint tensor (safetensors `get_slice`). With size 1 every layer is a
plain nn.Linear / nn.Embedding with the same parameter names.

- ColumnParallelLinear: output features split (weight and bias dim 0); `num_shards` < tp
  size replicates shards (KV heads fewer than ranks: rank r holds shard r // (tp / shards)).
- RowParallelLinear: input features split (weight dim 1); partial sums all-reduced, then
  the (replicated) bias added once (`reduce=False`: partial sums returned, e.g. to add to
  another partial sum before one all-reduce).
- VocabParallelEmbedding / ParallelLMHead: vocabulary split into ceil(V / tp) rows per rank
  (the last shard zero-padded); embeddings all-reduced, logits all-gathered and trimmed to V.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmhpc.distributed.group import get_tp


@dataclass(frozen=True)
class Shard:
    dim: int
    index: int
    count: int

    def bounds(self, full: int) -> tuple[int, int]:
        """[start, end) of this shard along `dim` of a tensor of `full` rows (ceil split)."""
        size = -(-full // self.count)
        start = min(full, self.index * size)
        return start, min(full, start + size)


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"tensor parallel size {d} does not divide {what} ({n})")
    return n // d


def _mark(param: torch.Tensor, dim: int, index: int, count: int) -> None:
    if count > 1:
        param.tp_shard = Shard(dim, index, count)


class ColumnParallelLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 num_shards: int | None = None):
        tp = get_tp()
        shards = num_shards or tp.size
        _divide(tp.size, shards, f"shards of a {out_features}-feature layer")
        super().__init__(in_features, _divide(out_features, shards, "output features"), bias=bias)
        index = tp.rank // (tp.size // shards)
        _mark(self.weight, 0, index, shards)
        if bias:
            _mark(self.bias, 0, index, shards)


class RowParallelLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, reduce: bool = True):
        self.tp = get_tp()
        if bias and not reduce:
            raise ValueError("a row-parallel layer returning partial sums cannot add its bias")
        super().__init__(_divide(in_features, self.tp.size, "input features"), out_features, bias=bias)
        _mark(self.weight, 1, self.tp.rank, self.tp.size)
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        if not self.reduce:
            return F.linear(x, self.weight)
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        self.tp = get_tp()
        self.vocab_size = num_embeddings
        self.shard = Shard(0, self.tp.rank, self.tp.size)
        self.vocab_start, self.vocab_end = self.shard.bounds(num_embeddings)
        super().__init__(-(-num_embeddings // self.tp.size), embedding_dim)
        _mark(self.weight, 0, self.tp.rank, self.tp.size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        mine = (ids >= self.vocab_start) & (ids < self.vocab_end)
        h = F.embedding((ids - self.vocab_start) * mine, self.weight)   # [T, hidden]
        h = h * mine[:, None].to(h.dtype)
        return self.tp.all_reduce(h)


class ParallelLMHead(nn.Linear):
    def __init__(self, hidden_size: int, vocab_size: int):
        self.tp = get_tp()
        self.vocab_size = vocab_size
        super().__init__(hidden_size, -(-vocab_size // self.tp.size), bias=False)
        _mark(self.weight, 0, self.tp.rank, self.tp.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)                                # [N, V / tp]
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather_last(logits)[..., :self.vocab_size]    # [N, V]

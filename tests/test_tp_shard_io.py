"""Each TP rank reads only its shard of the checkpoint (safetensors get_slice), counted in
bytes by the loader; shards are the right parts of the full tensors; KV heads fewer than
ranks are replicated (each rank holds the head its query heads use)."""
from __future__ import annotations

import pytest
import torch

from mmhpc.distributed.group import TPGroup, set_tp
from mmhpc.models import load_model
from mmhpc.models import loader


def _load(path, rank: int, size: int):
    prev = set_tp(TPGroup(rank, size))
    try:
        loader.bytes_read = 0
        model = load_model(path, tp_rank=rank, tp_size=size)
        return model, loader.bytes_read
    finally:
        set_tp(prev)


def _nbytes(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


@pytest.mark.parametrize("family,kv_heads", [("llava", 2), ("qwen2_vl", 1)])
def test_each_rank_reads_only_its_shard(family, kv_heads):
    from mmhpc.tools.tiny import tiny_checkpoint
    path = tiny_checkpoint(family, kv_heads=kv_heads)
    full, full_bytes = _load(path, 0, 1)
    shards = [_load(path, r, 2) for r in range(2)]
    decoder = sum(p.numel() * p.element_size() for n, p in full.named_parameters()
                  if n.startswith(("language_model.layers", "language_model.embed", "lm_head"))
                  and not n.endswith("norm.weight"))
    assert full_bytes == _nbytes(full)
    for model, nbytes in shards:
        assert nbytes == _nbytes(model)                     # read exactly what it holds
        assert nbytes < full_bytes - decoder // 3           # ~half the decoder: not all of it
    fp = dict(full.named_parameters())
    q, kv = "language_model.layers.0.self_attn.q_proj.weight", \
        "language_model.layers.0.self_attn.k_proj.weight"
    for r, (model, _) in enumerate(shards):
        p = dict(model.named_parameters())
        rows = fp[q].shape[0] // 2
        assert torch.equal(p[q], fp[q][r * rows:(r + 1) * rows])
        down = "language_model.layers.1.mlp.down_proj.weight"
        cols = fp[down].shape[1] // 2
        assert torch.equal(p[down], fp[down][:, r * cols:(r + 1) * cols])
        vocab = fp["lm_head.weight"].shape[0] // 2
        assert torch.equal(p["lm_head.weight"], fp["lm_head.weight"][r * vocab:(r + 1) * vocab])
        if kv_heads == 1:                                   # replicated on both ranks
            assert torch.equal(p[kv], fp[kv])
        else:
            n = fp[kv].shape[0] // 2
            assert torch.equal(p[kv], fp[kv][r * n:(r + 1) * n])

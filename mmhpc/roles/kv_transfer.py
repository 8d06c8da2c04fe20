"""Descriptor math for pulling KV blocks from a prefill pool into a decode pool (no nixl import).

A pool is `[num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim]`, contiguous, one
NIXL region. For (layer l, k/v, block b) the bytes of heads [h0, h1) are contiguous:
    offset = (((l * 2 + kv) * num_blocks + b) * num_kv_heads + h0) * block_size * head_dim * esz
so a block's KV is `num_layers * 2` regions. Runs of consecutive blocks on BOTH sides are merged
into one region per (layer, k/v). Different TP on the two sides (later): each decode TP rank
reads its head range from the prefill rank(s) that own those heads (`head_range`).
"""
from __future__ import annotations

from dataclasses import dataclass

from mmhpc.transport.descs import NixlDescs


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    itemsize: int

    @classmethod
    def of_pool(cls, kv_cache) -> "KVGeometry":
        # kv_cache: [L, 2, NB, H, BS, D]
        num_layers, two, _, heads, block_size, head_dim = kv_cache.shape
        assert two == 2 and kv_cache.is_contiguous()
        return cls(num_layers, heads, block_size, head_dim, kv_cache.element_size())

    @property
    def head_bytes(self) -> int:
        """Bytes of one head in one block (k or v of one layer)."""
        return self.block_size * self.head_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        return self.num_kv_heads * self.head_bytes

    def num_blocks(self, pool: NixlDescs) -> int:
        """Blocks of a pool of this geometry (the pool's size tells, the peer need not)."""
        per_block = self.num_layers * 2 * self.block_bytes
        if len(pool.regions) != 1 or pool.nbytes % per_block:
            raise ValueError(f"pool of {pool.nbytes} bytes does not match {self}")
        return pool.nbytes // per_block

    def offset(self, num_blocks: int, layer: int, kv: int, block: int, head: int = 0) -> int:
        return (((layer * 2 + kv) * num_blocks + block) * self.num_kv_heads + head) * self.head_bytes


def _runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) runs where both block lists advance by one."""
    runs: list[list[int]] = []
    for s, d in zip(src, dst):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [tuple(r) for r in runs]  # type: ignore[misc]


def plan_read(geo: KVGeometry, remote_pool: NixlDescs, remote_blocks: list[int],
              local_pool: NixlDescs, local_blocks: list[int],
              head_range: tuple[int, int] | None = None) -> tuple[NixlDescs, NixlDescs]:
    """(local descs, remote descs) moving `remote_blocks` of the peer's pool into
    `local_blocks` of ours, every layer, k and v; region i of one matches region i of the other."""
    if len(remote_blocks) != len(local_blocks):
        raise ValueError(f"{len(remote_blocks)} remote blocks for {len(local_blocks)} local")
    h0, h1 = head_range or (0, geo.num_kv_heads)
    r_nb, l_nb = geo.num_blocks(remote_pool), geo.num_blocks(local_pool)
    r_base, _, r_dev = remote_pool.regions[0]
    l_base, _, l_dev = local_pool.regions[0]
    full = (h0, h1) == (0, geo.num_kv_heads)
    local, remote = [], []
    for layer in range(geo.num_layers):
        for kv in (0, 1):
            for s, d, n in (_runs(remote_blocks, local_blocks) if full
                            else [(s, d, 1) for s, d in zip(remote_blocks, local_blocks)]):
                nbytes = (n * geo.block_bytes) if full else (h1 - h0) * geo.head_bytes
                remote.append([r_base + geo.offset(r_nb, layer, kv, s, h0), nbytes, r_dev])
                local.append([l_base + geo.offset(l_nb, layer, kv, d, h0), nbytes, l_dev])
    return (NixlDescs(local_pool.agent, local_pool.mem_type, local),
            NixlDescs(remote_pool.agent, remote_pool.mem_type, remote))

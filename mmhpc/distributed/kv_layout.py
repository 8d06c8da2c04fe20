"""Which KV heads live on which TP rank, and the NIXL descriptors that move them between
pools of different TP sizes (pure functions; no nixl import).

A rank's pool is `[num_layers, 2, num_blocks, local_kv_heads, block_size, head_dim]`, head-
major inside a block, so heads [h0, h1) of (layer, k/v, block) are contiguous bytes. With K
KV heads and tp ranks, rank r holds heads [r*K/tp, (r+1)*K/tp) when K >= tp, else the one
head r // (tp/K) (replicated: the head its query heads use).

A decode rank reads, for every head it holds, from the prefill rank that holds it (of the
replicas, the one `src_rank % replicas` matches, to spread reads), grouped so that it issues
ONE READ per prefill rank: `plan_tp_reads`.
"""
from __future__ import annotations

from dataclasses import dataclass

from mmhpc.transport.descs import NixlDescs


def local_kv_heads(num_kv_heads: int, tp: int) -> int:
    return max(1, num_kv_heads // tp)


def heads_of(num_kv_heads: int, tp: int, rank: int) -> tuple[int, int]:
    """[start, end) of the global KV heads TP rank `rank` of `tp` holds."""
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ValueError(f"tp={tp} neither divides nor is a multiple of {num_kv_heads} KV heads")
    if num_kv_heads >= tp:
        n = num_kv_heads // tp
        return rank * n, (rank + 1) * n
    h = rank // (tp // num_kv_heads)
    return h, h + 1


def holders(num_kv_heads: int, tp: int, head: int) -> list[int]:
    """TP ranks (of `tp`) that hold global KV head `head`."""
    return [r for r in range(tp) if heads_of(num_kv_heads, tp, r)[0] <= head
            < heads_of(num_kv_heads, tp, r)[1]]


@dataclass(frozen=True)
class HeadRead:
    """Heads [src_head, src_head + num_heads) of prefill rank `src_rank`'s pool (local head
    indices) land in heads [dst_head, ...) of the decode rank's pool."""
    src_rank: int
    src_head: int
    dst_head: int
    num_heads: int


def head_reads(num_kv_heads: int, src_tp: int, dst_tp: int, dst_rank: int) -> list[HeadRead]:
    """What decode rank `dst_rank` (of `dst_tp`) reads from prefill ranks (of `src_tp`)."""
    d0, d1 = heads_of(num_kv_heads, dst_tp, dst_rank)
    out: list[HeadRead] = []
    for h in range(d0, d1):
        ranks = holders(num_kv_heads, src_tp, h)
        src = ranks[dst_rank % len(ranks)]
        s0 = heads_of(num_kv_heads, src_tp, src)[0]
        last = out[-1] if out else None
        if last and last.src_rank == src and last.src_head + last.num_heads == h - s0 \
                and last.dst_head + last.num_heads == h - d0:
            out[-1] = HeadRead(src, last.src_head, last.dst_head, last.num_heads + 1)
        else:
            out.append(HeadRead(src, h - s0, h - d0, 1))
    return out


@dataclass(frozen=True)
class PoolGeometry:
    """One rank's pool: the sizes that place a (layer, k/v, block, head) in its bytes."""
    num_layers: int
    num_blocks: int
    num_heads: int             # this rank's KV heads
    block_size: int
    head_dim: int
    itemsize: int

    @property
    def head_bytes(self) -> int:
        return self.block_size * self.head_dim * self.itemsize

    def offset(self, layer: int, kv: int, block: int, head: int) -> int:
        return (((layer * 2 + kv) * self.num_blocks + block) * self.num_heads + head) \
            * self.head_bytes

    @classmethod
    def of(cls, pool: NixlDescs, num_layers: int, num_heads: int, block_size: int,
           head_dim: int, itemsize: int) -> "PoolGeometry":
        per_block = num_layers * 2 * num_heads * block_size * head_dim * itemsize
        if len(pool.regions) != 1 or pool.nbytes % per_block:
            raise ValueError(f"pool of {pool.nbytes} bytes is not [{num_layers}, 2, *, "
                             f"{num_heads}, {block_size}, {head_dim}] x {itemsize} bytes")
        return cls(num_layers, pool.nbytes // per_block, num_heads, block_size, head_dim, itemsize)


def _descs(src: PoolGeometry, dst: PoolGeometry, r: HeadRead, src_blocks: list[int],
           dst_blocks: list[int]) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(dst offsets+sizes, src offsets+sizes); whole blocks on both sides merge into runs."""
    whole = r.num_heads == src.num_heads == dst.num_heads
    runs: list[list[int]] = []
    for s, d in zip(src_blocks, dst_blocks):
        if whole and runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    local, remote = [], []
    for layer in range(src.num_layers):
        for kv in (0, 1):
            for s, d, n in runs:
                nbytes = n * r.num_heads * src.head_bytes
                remote.append((src.offset(layer, kv, s, r.src_head), nbytes))
                local.append((dst.offset(layer, kv, d, r.dst_head), nbytes))
    return local, remote


def plan_tp_reads(num_kv_heads: int, src_pools: list[NixlDescs], src_blocks: list[int],
                  dst_pool: NixlDescs, dst_blocks: list[int], dst_tp: int, dst_rank: int, *,
                  num_layers: int, block_size: int, head_dim: int, itemsize: int
                  ) -> list[tuple[int, NixlDescs, NixlDescs]]:
    """[(prefill rank, local descs, remote descs)]: ONE READ per prefill rank that moves every
    layer's k and v of `src_blocks` (the same block ids on every prefill rank) into
    `dst_blocks` of this decode rank's pool; region i of local matches region i of remote."""
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"{len(src_blocks)} remote blocks for {len(dst_blocks)} local")
    src_tp = len(src_pools)
    sizes = dict(num_layers=num_layers, block_size=block_size, head_dim=head_dim,
                 itemsize=itemsize)
    dst = PoolGeometry.of(dst_pool, num_heads=local_kv_heads(num_kv_heads, dst_tp), **sizes)
    by_rank: dict[int, tuple[list, list]] = {}
    for r in head_reads(num_kv_heads, src_tp, dst_tp, dst_rank):
        pool = src_pools[r.src_rank]
        src = PoolGeometry.of(pool, num_heads=local_kv_heads(num_kv_heads, src_tp), **sizes)
        local, remote = _descs(src, dst, r, src_blocks, dst_blocks)
        acc = by_rank.setdefault(r.src_rank, ([], []))
        acc[0].extend(local)
        acc[1].extend(remote)
    out = []
    for rank, (local, remote) in sorted(by_rank.items()):
        l_base, _, l_dev = dst_pool.regions[0]
        r_base, _, r_dev = src_pools[rank].regions[0]
        out.append((rank,
                    NixlDescs(dst_pool.agent, dst_pool.mem_type,
                              [[l_base + o, n, l_dev] for o, n in local]),
                    NixlDescs(src_pools[rank].agent, src_pools[rank].mem_type,
                              [[r_base + o, n, r_dev] for o, n in remote])))
    return out

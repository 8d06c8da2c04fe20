"""Which instance serves a request's stage: the least loaded one, unless another already holds
the request's prompt prefix (prefill, aggregated) or its images (encode).

The frontend cannot see the instances' caches, so it remembers what it sent where: for each
prefill or aggregated instance the KV block hashes of the prompts routed to it (an LRU as large
as that instance's KV pool, as its block manager evicts the oldest), for each encoder the
content hashes of its images. A candidate scores its load minus `affinity` times the fraction
of the request it would find cached (the leading blocks of the prompt, or the images); the
lowest score wins, ties go to the most free KV blocks, then to the lowest rank. With
`affinity` 0, or one candidate, it is plain least-loaded. No sockets, no torch.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Sequence

from mmhpc.engine.block_manager import chain_hashes

MAX_IMAGES = 4096               # content hashes remembered per encoder


class CacheMap:
    """An LRU set of keys: what one instance probably still holds."""

    def __init__(self) -> None:
        self.keys: OrderedDict[Hashable, None] = OrderedDict()

    def num_leading(self, keys: Sequence[Hashable]) -> int:
        """How many of `keys`, from the first, are held (a prefix stops at its first miss)."""
        n = 0
        for k in keys:
            if k not in self.keys:
                break
            n += 1
        return n

    def num_held(self, keys: Sequence[Hashable]) -> int:
        return sum(k in self.keys for k in keys)

    def add(self, keys: Sequence[Hashable], capacity: int) -> None:
        for k in keys:
            self.keys[k] = None
            self.keys.move_to_end(k)
        while len(self.keys) > capacity:
            self.keys.popitem(last=False)


class Router:
    def __init__(self, block_size: int, affinity: float) -> None:
        self.block_size = block_size
        self.affinity = affinity
        self.maps: dict[int, CacheMap] = {}

    def prompt_keys(self, token_ids: list[int], mm_items) -> list[int]:
        """The block hashes a prefix-cache lookup of this prompt would try (full blocks, the
        last token's excluded), as the engine's block manager computes them."""
        num_full = (len(token_ids) - 1) // self.block_size
        return chain_hashes(token_ids[:num_full * self.block_size], mm_items, self.block_size)

    def pick(self, ranks: list[int], load: Callable[[int], tuple[float, int]],
             keys: Sequence[Hashable] = (), prefix: bool = True) -> int:
        """The rank to use. `load(r)` = (queued requests, free KV blocks); `keys`: the prompt's
        block hashes (`prefix`) or the images' content hashes."""
        def score(r: int) -> tuple:
            queued, free = load(r)
            hit = 0.0
            m = self.maps.get(r)
            if keys and m is not None:
                held = m.num_leading(keys) if prefix else m.num_held(keys)
                hit = held / len(keys)
            return (queued - self.affinity * hit, -free, r)
        if len(ranks) == 1:
            return ranks[0]
        return min(ranks, key=score)

    def record(self, rank: int, keys: Sequence[Hashable], capacity: int) -> None:
        """`keys` went to `rank` (which holds at most `capacity` of them)."""
        if keys:
            self.maps.setdefault(rank, CacheMap()).add(keys, max(1, capacity))

    def wants_keys(self, ranks: list[int]) -> bool:
        """Whether computing keys can change a pick (hashing is skipped otherwise)."""
        return self.affinity > 0 and len(ranks) > 1

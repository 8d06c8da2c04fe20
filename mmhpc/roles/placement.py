"""Where a request's stages run: the frontend's picture of every instance's load (its own
in-flight counts + each rank's last Heartbeat) and the cache-aware `Router` over it.

    place(prompt keys, image hashes) -> (encode rank | -1, prefill rank | -1, decode rank)
Aggregated deployments use the decode slot for the aggregated instance. No sockets.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from typing import Callable

from mmhpc.engine.block_manager import INLINE_HASH_TOKENS
from mmhpc.roles.router import MAX_IMAGES, Router


class Placement:
    def __init__(self, config, layout, refresh: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.encoders = layout.leaders("encode")
        self.prefills = layout.leaders("prefill")
        self.decoders = layout.leaders("decode")
        self.aggregated = layout.leaders("aggregated")
        self.rank_stats: dict[int, dict] = {}
        self.in_flight: Counter = Counter()
        self.router = Router(config.cache.block_size, config.deployment.cache_affinity)
        self._refresh = refresh          # the local worker's stats into rank_stats

    async def prefix_keys(self, prompt_token_ids, mm_items) -> list[int]:
        """The prompt's prefix-cache block hashes: for the router, and sent with the request so
        the prefill / aggregated rank's scheduler need not make them (~4 µs a block, on the
        GPU's critical path there); a long prompt is hashed off the event loop."""
        if not self.config.cache.enable_prefix_caching:
            return []
        ids = list(prompt_token_ids)
        items = sorted(mm_items, key=lambda it: it.offset)
        if len(ids) > INLINE_HASH_TOKENS:
            return await asyncio.to_thread(self.router.prompt_keys, ids, items)
        return self.router.prompt_keys(ids, items)

    def place(self, keys: list[int], image_hashes: list[str]) -> tuple[int, int, int]:
        if self.aggregated:
            return -1, -1, self.pick(self.aggregated, self._routing(self.aggregated, keys))
        enc = -1
        if self.encoders and image_hashes:
            enc = self.pick(self.encoders, image_hashes if self.router.wants_keys(self.encoders)
                            else [], prefix=False)
        pre = self.pick(self.prefills, self._routing(self.prefills, keys))
        return enc, pre, self.pick(self.decoders)

    def _routing(self, ranks: list[int], keys: list[int]) -> list[int]:
        """`keys` where they can change the pick among `ranks` (else none: nothing recorded)."""
        return keys if self.router.wants_keys(ranks) else []

    def pick(self, ranks: list[int], keys: list = (), prefix: bool = True) -> int:
        """Least loaded (own in-flight count + reported queue, then most free blocks), where
        the prompt's block hashes (`prefix`) or the images' content hashes in `keys` count as
        cached on the rank they were last sent to (mmhpc.roles.router)."""
        self._refresh()

        def load(r: int) -> tuple[float, int]:
            s = self.rank_stats.get(r, {})
            return (self.in_flight[r] + s.get("num_waiting", 0) + s.get("num_waiting_kv", 0),
                    s.get("num_free_blocks", 0))
        rank = self.router.pick(ranks, load, keys, prefix)
        capacity = (self.rank_stats.get(rank, {}).get("num_total_blocks", 1 << 20) if prefix
                    else MAX_IMAGES)
        self.router.record(rank, keys, capacity)
        return rank

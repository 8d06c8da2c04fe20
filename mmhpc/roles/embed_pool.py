"""A slab of embedding rows in one NIXL-registered tensor, with a first-fit row allocator.

Encode writes image embedding bundles here (peers READ them); prefill lands its READs here.
The tensor is registered once, before the NIXL metadata exchange; allocations are row ranges.
A row is `row_width(engine)` wide: an image's DeepStack features ride in its embedding rows,
so one registration and one READ move them all. The pool's size, in rows (one per image
token), is `cache.embedding_pool_rows`, by default twice `model.max_model_len`: a request
longer than that is refused anyway, so any admissible request fits alone, and a full pool
means waiting for others to finish, never a failure.
"""
from __future__ import annotations

import torch


def embedding_pool_rows(config) -> int:
    """The pool's rows for this config (the frontend checks requests against it too)."""
    return config.cache.embedding_pool_rows or 2 * config.model.max_model_len


def row_width(engine) -> int:
    """One image token's row of an embedding bundle: the hidden size, times 1 + the engine's
    DeepStack levels (Qwen3-VL's per-layer features travel in the same row)."""
    return engine.hidden_size * (1 + engine.deepstack_levels)


class EmbeddingPool:
    def __init__(self, hidden_size: int, dtype: torch.dtype, num_rows: int,
                 device: str | torch.device = "cpu") -> None:
        self.num_rows = num_rows
        self.tensor = torch.zeros(num_rows, hidden_size, dtype=dtype, device=device)  # [R, D]
        self._free: list[tuple[int, int]] = [(0, self.num_rows)]     # (start, length), sorted

    @property
    def num_free_rows(self) -> int:
        return sum(n for _, n in self._free)

    @property
    def row_bytes(self) -> int:
        return self.tensor.shape[1] * self.tensor.element_size()

    def alloc(self, num_rows: int) -> int | None:
        """First row of `num_rows` free rows, or None (full: evict and retry)."""
        for i, (start, n) in enumerate(self._free):
            if n >= num_rows:
                self._free[i] = (start + num_rows, n - num_rows)
                if self._free[i][1] == 0:
                    del self._free[i]
                return start
        return None

    def free(self, start: int, num_rows: int) -> None:
        self._free.append((start, num_rows))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for s, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self._free = merged

    def rows(self, start: int, num_rows: int) -> torch.Tensor:
        return self.tensor[start:start + num_rows]      # contiguous view: [n, D]

"""Paged KV blocks: a fixed pool, reference counts, and prefix caching (no torch).

A sequence's `block_table` maps its token i to slot `block_table[i // block_size] * block_size
+ i % block_size`. With prefix caching, every FULL block whose KV is computed gets a chained
hash over (parent hash, its token ids, the content hashes of the images whose placeholders it
holds); a later prompt with the same prefix reuses those blocks instead of recomputing them.
Freed blocks keep their hash and stay reusable until the pool needs them (LRU eviction).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from mmhpc.engine.sequence import Sequence


INLINE_HASH_TOKENS = 4096   # callers on an event loop hash longer prompts in a worker thread


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_hash(parent: int | None, token_ids: list[int], mm_keys: list[str]) -> int:
    """128-bit chained hash: equal only for equal prefixes with equal images."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"root" if parent is None else parent.to_bytes(16, "little"))
    h.update(array("q", token_ids).tobytes())
    for key in mm_keys:
        h.update(key.encode())
    return int.from_bytes(h.digest(), "little")


def chain_hashes(token_ids: list[int], mm_items, block_size: int, first: int = 0,
                 parent: int | None = None) -> list[int]:
    """`block_hash` of blocks first, first + 1, ... of a sequence, chained from `parent` (the
    hash of block first - 1): `token_ids` holds exactly those blocks' tokens, `mm_items` (with
    content_hash, offset, num_tokens) the sequence's images. The token bytes are made once."""
    raw = memoryview(array("q", token_ids).tobytes())
    width = block_size * 8                                  # one block of int64 ids
    prev = parent.to_bytes(16, "little") if parent is not None else b"root"
    out = []
    for k in range(len(token_ids) // block_size):
        start = (first + k) * block_size
        end = start + block_size
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(raw[k * width:(k + 1) * width])
        for it in mm_items:
            if it.offset < end and it.offset + it.num_tokens > start:
                h.update(f"{it.content_hash}@{it.offset - start}/{it.num_tokens}".encode())
        prev = h.digest()
        out.append(int.from_bytes(prev, "little"))
    return out


def pack_hashes(hashes: list[int]) -> bytes:
    """Block hashes as 16 little-endian bytes each (messages: msgpack has no 128-bit ints)."""
    return b"".join(h.to_bytes(16, "little") for h in hashes)


def unpack_hashes(raw: bytes) -> list[int]:
    if len(raw) % 16:
        raise ValueError(f"packed block hashes of {len(raw)} bytes (not a multiple of 16)")
    return [int.from_bytes(raw[i:i + 16], "little") for i in range(0, len(raw), 16)]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks, block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Blocks with ref count 0, evicted from the front; cached (hashed) ones sit at the back.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._seq_hashes: dict[str, list[int]] = {}   # request_id -> hashes of its full blocks
        self._num_visited: dict[str, int] = {}        # request_id -> blocks cache_blocks saw

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (including cached ones that would be evicted)."""
        return len(self.free_blocks)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[int]:
        """Slots for tokens [0, num_computed_tokens + num_new_tokens); returns new block ids."""
        return self.allocate_for_tokens(seq, seq.num_computed_tokens + num_new_tokens)

    def allocate_for_tokens(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Give tokens [0, num_tokens) slots (e.g. for KV that arrives from another rank)."""
        num_needed = cdiv(num_tokens, self.block_size) - len(seq.block_table)
        if num_needed <= 0:                 # most decode steps: the last block has room
            return []
        if num_needed > len(self.free_blocks):
            raise RuntimeError(f"out of KV blocks: {seq.request_id} needs {num_needed}, "
                               f"{len(self.free_blocks)} free (call can_allocate first)")
        new = [self._take_free() for _ in range(num_needed)]
        seq.block_table.extend(new)
        return new

    def mark_computed(self, seq: Sequence, num_tokens: int) -> None:
        """Tokens [0, num_tokens) now hold valid KV (written by a transfer): cache full blocks."""
        assert num_tokens <= len(seq.block_table) * self.block_size, "mark_computed past the blocks"
        seq.num_computed_tokens = num_tokens
        self.cache_blocks(seq)

    def free(self, seq: Sequence) -> None:
        """Drop the seq's references. Its tail blocks are freed first, so they are evicted first."""
        self._drop_blocks(seq)
        self._seq_hashes.pop(seq.request_id, None)

    def hold(self, block_ids: list[int]) -> None:
        """One more reference on each block: not handed out again until `unhold` (e.g. a
        transfer into them may still land after their seq is gone)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.free_blocks[block_id]
            self.ref_counts[block_id] += 1

    def unhold(self, block_ids: list[int]) -> None:
        self._unref(reversed(block_ids))

    def _unref(self, block_ids) -> None:
        for block_id in block_ids:
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"block {block_id} freed twice"
            if self.ref_counts[block_id] == 0:
                self.free_blocks[block_id] = None
                if self.hashes[block_id] is None:   # worthless: reuse before cached ones
                    self.free_blocks.move_to_end(block_id, last=False)

    def _drop_blocks(self, seq: Sequence) -> None:
        self._unref(reversed(seq.block_table))
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._num_visited.pop(seq.request_id, None)

    # ---- prefix caching ---------------------------------------------------------------------

    def lookup_prefix(self, seq: Sequence) -> int:
        """Reuse cached blocks for the longest cached prefix of a seq that holds no blocks.

        Takes a reference on each hit, sets and returns `seq.num_computed_tokens`. The last token
        is never a hit, so the model always computes at least one token (its logits)."""
        assert not seq.block_table, f"lookup_prefix on {seq.request_id} that holds blocks"
        if not self.enable_prefix_caching:
            return 0
        num_full = (seq.num_tokens - 1) // self.block_size
        for h in self._hashes(seq, num_full)[:num_full]:
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            if self.ref_counts[block_id] == 0:
                del self.free_blocks[block_id]
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def undo_lookup(self, seq: Sequence) -> None:
        """Give back what lookup_prefix took (admission failed); keeps the seq's hashes."""
        self._drop_blocks(seq)

    def cache_blocks(self, seq: Sequence) -> None:
        """Register the full blocks whose KV is computed, so later prompts can share them.

        Called after every step: only blocks that became full since the last call are visited
        (a decode step costs O(1) per seq, not O(its blocks))."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        first = self._num_visited.get(seq.request_id, 0)
        if num_full <= first:
            return
        hashes = self._hashes(seq, num_full)
        for i in range(first, num_full):
            block_id, h = seq.block_table[i], hashes[i]
            if self.hashes[block_id] is not None:
                continue                    # already cached (or a shared hit)
            if h in self.hash_to_block:
                continue                    # the same content computed twice: keep the first
            self.hashes[block_id] = h
            self.hash_to_block[h] = block_id
        self._num_visited[seq.request_id] = num_full

    def prompt_hashes(self, token_ids: list[int], mm_items) -> list[int]:
        """The hashes of a prompt's full blocks, to give a Sequence as `block_hashes`: pure,
        so a preprocessing thread can make them while the engine's thread waits on the GPU."""
        n = len(token_ids) // self.block_size * self.block_size
        return chain_hashes(token_ids[:n], mm_items, self.block_size)

    def _hashes(self, seq: Sequence, num_full: int) -> list[int]:
        """Chained hashes of the seq's blocks, at least its first `num_full` (memoized per
        request, seeded by `seq.block_hashes`; the list itself: do not change it)."""
        hashes = self._seq_hashes.get(seq.request_id)
        if hashes is None:
            hashes = self._seq_hashes[seq.request_id] = list(seq.block_hashes or ())
        first = len(hashes)
        if first < num_full:
            bs = self.block_size
            hashes += chain_hashes(seq.token_slice(first * bs, num_full * bs), seq.mm_items, bs,
                                   first, hashes[-1] if hashes else None)
        return hashes

    def _take_free(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        h = self.hashes[block_id]
        if h is not None:                   # evict the cached content
            self.hashes[block_id] = None
            if self.hash_to_block.get(h) == block_id:
                del self.hash_to_block[h]
        self.ref_counts[block_id] = 1
        return block_id

    def block_ids(self, seq: Sequence) -> list[int]:
        return list(seq.block_table)

"""BlockManager: allocation, ref counts, prefix caching (incl. image hashes), eviction."""
import subprocess
import sys

import pytest

from mmhpc.engine.block_manager import BlockManager
from mmhpc.engine.sequence import MMItem
from tests.helpers_engine import make_seq


def prefill(bm: BlockManager, seq) -> int:
    """Admit a seq as the scheduler does and mark its whole prompt computed."""
    cached = bm.lookup_prefix(seq)
    bm.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
    bm.mark_computed(seq, seq.num_tokens)
    return cached


def test_allocate_and_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, 10)
    assert bm.can_allocate(seq, 10)
    new = bm.allocate(seq, 10)
    assert len(new) == 3 and seq.block_table == new and bm.num_free_blocks == 5
    seq.num_computed_tokens = 10
    assert bm.allocate(seq, 2) == []              # slots 10, 11 fit the 3rd block
    assert len(bm.allocate(seq, 3)) == 1          # slot 12 opens a 4th
    assert not bm.can_allocate(make_seq(1, 40), 40)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(make_seq(1, 40), 40)
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.ref_counts == [0] * 8


def test_prefix_hit_shares_blocks_and_refcounts():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq("a", 10)
    assert prefill(bm, a) == 0
    b = make_seq("b", 10)
    assert bm.lookup_prefix(b) == 8               # two full blocks; 3rd is partial
    assert b.block_table == a.block_table[:2]
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert [bm.ref_counts[x] for x in b.block_table] == [1, 1]


def test_never_hits_whole_prompt():
    bm = BlockManager(num_blocks=16, block_size=4)
    prefill(bm, make_seq("a", 8))
    b = make_seq("b", 8)
    assert bm.lookup_prefix(b) == 4               # the last token's block is recomputed


def test_different_images_do_not_share():
    bm = BlockManager(num_blocks=32, block_size=4)
    prompt = [5, 6] + [9] * 6 + [7, 8, 10, 11]      # 6 image placeholders at offset 2

    def seq(rid, h):
        return make_seq(rid, 0, prompt=prompt, mm_items=[MMItem(h, offset=2, num_tokens=6)])

    prefill(bm, seq("a", "img-1"))
    assert bm.lookup_prefix(seq("b", "img-2")) == 0
    assert bm.lookup_prefix(seq("c", "img-1")) == 8
    # the image ends inside block 1: block 2 is pure text but chained after the image
    assert bm.lookup_prefix(make_seq("d", 0, prompt=prompt)) == 0


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = make_seq("a", 5, start=100), make_seq("b", 5, start=200)
    prefill(bm, a)
    prefill(bm, b)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    # the unhashed partial blocks go first, then the least recently freed cached block (a's)
    c = make_seq("c", 12, start=300)
    bm.allocate(c, 12)
    assert bm.lookup_prefix(make_seq("a2", 5, start=100)) == 0
    b2 = make_seq("b2", 5, start=200)
    assert bm.lookup_prefix(b2) == 4
    assert bm.num_free_blocks == 0


def cached_prompt(num_blocks: int):
    """A 9-token seq prefilled then freed (its 2 full blocks stay cached), and a new seq with the
    same prompt."""
    bm = BlockManager(num_blocks=num_blocks, block_size=4)
    a = make_seq("a", 9)
    prefill(bm, a)
    bm.free(a)
    return bm, make_seq("b", 9)


def test_cache_hit_takes_block_off_free_list():
    bm, b = cached_prompt(num_blocks=3)
    assert bm.lookup_prefix(b) == 8
    assert bm.num_free_blocks == 1
    assert bm.can_allocate(b, 1) and not bm.can_allocate(b, 5)


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    prefill(bm, make_seq("a", 10))
    assert bm.lookup_prefix(make_seq("b", 10)) == 0 and bm.num_cached_blocks == 0


def test_undo_lookup_returns_blocks():
    bm, b = cached_prompt(num_blocks=8)
    bm.lookup_prefix(b)
    bm.undo_lookup(b)
    assert bm.num_free_blocks == 8 and b.block_table == [] and b.num_computed_tokens == 0
    assert bm.lookup_prefix(b) == 8


def test_remote_allocation_and_mark_computed():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq("r", 9)
    ids = bm.allocate_for_tokens(seq, 9)
    assert bm.block_ids(seq) == ids and len(ids) == 3
    bm.mark_computed(seq, 9)
    assert seq.num_computed_tokens == 9 and bm.num_cached_blocks == 2


def test_decoded_blocks_are_cached_as_they_fill():
    """cache_blocks after every one-token step visits only new full blocks; every block a
    decode filled, before and after a preemption, is a prefix hit for the same tokens."""
    bm = BlockManager(num_blocks=32, block_size=4)
    a = make_seq("a", 6)
    prefill(bm, a)
    for t in range(11):                            # decode 11 tokens: 17 in all, 4 full blocks
        a.output_token_ids.append(100 + t)
        bm.allocate(a, 1)
        a.num_computed_tokens += 1
        bm.cache_blocks(a)
        if t == 4:                                  # preempted, recomputed, decoding on
            bm.free(a)
            prefill(bm, a)
    same = make_seq("b", 0)
    same.prompt_token_ids = a.token_ids + [7]
    assert bm.lookup_prefix(same) == 16
    assert same.block_table == a.block_table[:4]
    assert bm.num_cached_blocks == 4


def test_memoized_hashes_are_block_hash_chains():
    """The manager's hashes (token bytes made once per batch of new blocks, extended as a
    seq decodes) equal `block_hash` chained block by block, images included."""
    from mmhpc.engine.block_manager import block_hash
    bm = BlockManager(num_blocks=64, block_size=4)
    prompt = [5, 6] + [9] * 6 + list(range(20, 31))
    seq = make_seq("a", 0, prompt=prompt, mm_items=[MMItem("h1", 2, 6)])
    got = list(bm._hashes(seq, 3))
    seq.output_token_ids = [40, 41, 42, 43, 44]
    got = list(bm._hashes(seq, 6))
    want, parent = [], None
    for b in range(6):
        toks = seq.token_ids[4 * b:4 * b + 4]
        keys = [f"h1@{2 - 4 * b}/6"] if 4 * b < 8 and 4 * b + 4 > 2 else []
        parent = block_hash(parent, toks, keys)
        want.append(parent)
    assert got == want


def test_seeded_hashes_equal_the_managers_own():
    """`prompt_hashes` (made off the engine's thread) seed a seq's hashes: the same values as
    the manager's own, the same prefix hits, extended past the prompt as it decodes."""
    items = [MMItem("h1", 2, 6)]
    prompt = [5, 6] + [9] * 6 + list(range(20, 31))          # 19 tokens: 4 full blocks
    own, seeded = BlockManager(64, 4), BlockManager(64, 4)
    a = make_seq("a", 0, prompt=prompt, mm_items=items)
    b = make_seq("a", 0, prompt=prompt, mm_items=items)
    b.block_hashes = seeded.prompt_hashes(prompt, items)
    assert len(b.block_hashes) == 4
    a.output_token_ids = b.output_token_ids = [40, 41, 42, 43, 44]
    assert list(seeded._hashes(b, 6)) == list(own._hashes(a, 6))
    # a seeded seq finds what an unseeded one cached
    for bm, seq in ((own, a),):
        bm.lookup_prefix(seq)
        bm.allocate(seq, seq.num_tokens)
        bm.mark_computed(seq, seq.num_tokens)
    c = make_seq("c", 0, prompt=prompt + [7], mm_items=items)
    c.block_hashes = own.prompt_hashes(c.prompt_token_ids, items)
    assert own.lookup_prefix(c) == 16 and c.block_table == a.block_table[:4]
    other = make_seq("d", 0, prompt=prompt + [7], mm_items=[MMItem("h2", 2, 6)])
    other.block_hashes = own.prompt_hashes(other.prompt_token_ids, other.mm_items)
    assert own.lookup_prefix(other) == 0                        # another image: no hit


def test_token_slice():
    seq = make_seq("a", 5)
    seq.output_token_ids = [50, 51, 52]
    for start in range(9):
        for end in range(start, 9):
            assert seq.token_slice(start, end) == seq.token_ids[start:end], (start, end)


def test_modules_import_no_torch():
    code = ("import sys, mmhpc.engine.scheduler, mmhpc.engine.block_manager, tests.helpers_engine;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_packed_hashes_round_trip_and_frontend_hashes_check_the_block_size():
    from types import SimpleNamespace

    from mmhpc.engine.block_manager import pack_hashes, unpack_hashes
    from mmhpc.roles.worker import frontend_hashes
    bm = BlockManager(64, 4)
    hashes = bm.prompt_hashes(list(range(30)), [MMItem("h1", 2, 6)])
    raw = pack_hashes(hashes)
    assert len(raw) == 16 * 7 and unpack_hashes(raw) == hashes
    with pytest.raises(ValueError, match="multiple of 16"):
        unpack_hashes(raw[:-1])
    engine = SimpleNamespace(block_size=bm.block_size)           # the engine interface's
    msg = SimpleNamespace(block_hashes=raw, hash_block_size=4)
    assert frontend_hashes(msg, engine) == hashes
    msg.hash_block_size = 16                 # made for another block size: not used
    assert frontend_hashes(msg, engine) is None
    msg.hash_block_size = 0
    assert frontend_hashes(msg, engine) is None

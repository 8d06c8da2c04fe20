"""Router (mmhpc.roles.router): least loaded, unless another instance holds the prompt's
prefix or the images; prompt keys are the block manager's own hashes."""
from __future__ import annotations

import subprocess
import sys

from mmhpc.engine.block_manager import BlockManager
from mmhpc.engine.sequence import MMItem
from mmhpc.roles.router import Router
from tests.helpers_engine import make_seq


def loads(table: dict[int, tuple[float, int]]):
    return lambda r: table.get(r, (0, 100))


def test_prompt_keys_are_the_block_managers_lookup_hashes():
    prompt = list(range(100, 110)) + [7] * 8 + list(range(200, 215))
    items = [MMItem("img", 10, 8)]
    bm = BlockManager(num_blocks=32, block_size=4)
    seq = make_seq("a", 0, prompt=prompt, mm_items=items)
    want = bm._hashes(seq, (len(prompt) - 1) // 4)
    assert Router(4, 2.0).prompt_keys(prompt, items) == want
    assert len(want) == 8                              # 33 tokens: the last one is not looked up


def test_least_loaded_without_affinity_or_history():
    r = Router(4, 2.0)
    assert r.pick([3, 5], loads({3: (2, 10), 5: (1, 10)}), [11, 12]) == 5
    assert r.pick([3, 5], loads({3: (1, 10), 5: (1, 50)}), [11, 12]) == 5    # more free blocks
    assert r.pick([3, 5], loads({}), [11, 12]) == 3                          # then lowest rank
    r.record(5, [11, 12], 100)
    assert Router(4, 0.0).pick([3, 5], loads({}), [11, 12]) == 3             # affinity 0: off


def test_prefix_holder_wins_until_it_is_too_busy():
    r = Router(4, 2.0)
    r.record(5, [11, 12, 13, 14], 100)
    assert r.pick([3, 5], loads({}), [11, 12, 13, 14]) == 5
    assert r.pick([3, 5], loads({5: (1, 10), 3: (0, 10)}), [11, 12, 13, 14]) == 5
    assert r.pick([3, 5], loads({5: (3, 10), 3: (0, 10)}), [11, 12, 13, 14]) == 3
    # a prefix stops at its first miss: [99, 12, ...] shares nothing with what 5 holds
    assert r.pick([3, 5], loads({}), [99, 12, 13, 14]) == 3
    # half the prefix is worth half the affinity
    assert r.pick([3, 5], loads({5: (1, 10), 3: (0, 10)}), [11, 12, 98, 99]) == 3
    assert r.pick([3, 5], loads({5: (0.5, 10), 3: (0, 10)}), [11, 12, 98, 99]) == 5


def test_images_held_in_any_order_and_lru_capacity():
    r = Router(4, 2.0)
    r.record(7, ["a", "b"], 2)
    assert r.pick([6, 7], loads({}), ["b", "a"], prefix=False) == 7
    r.record(7, ["c"], 2)                             # evicts "a", the oldest
    assert r.pick([6, 7], loads({7: (0.9, 10)}), ["a"], prefix=False) == 6
    assert r.pick([6, 7], loads({7: (0.9, 10)}), ["c"], prefix=False) == 7


def test_one_candidate_needs_no_keys():
    r = Router(4, 2.0)
    assert not r.wants_keys([4]) and r.wants_keys([4, 5])
    assert not Router(4, 0.0).wants_keys([4, 5])
    assert r.pick([4], loads({4: (9, 0)})) == 4


def test_imports_no_torch_and_no_sockets():
    code = ("import sys, mmhpc.roles.router;"
            "assert not {'torch', 'zmq'} & set(sys.modules), 'torch or zmq imported'")
    subprocess.run([sys.executable, "-c", code], check=True)

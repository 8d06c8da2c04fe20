"""READs that may still be landing after their request is gone keep their memory taken.
Decode: a pull dropped mid-transfer (abort, timeout) holds its KV blocks; prefill: an embedding
READ past its deadline holds its landing rows; both until the READ is over, or another
kv_transfer_s passed.

Real workers (tiny LLaVA engine, a real NIXL agent holding the pools). The READ's progress is
the one thing set by hand: NIXL over DRAM here finishes a READ inside the call that
posts it (1 GiB measured), so no real transfer is ever in flight long enough to abort."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from mmhpc.config import Config


@pytest.fixture()
def worker():
    from mmhpc.roles.decode import DecodeWorker
    from mmhpc.tools.tiny import tiny_checkpoint
    from mmhpc.transport.nixl_agent import NixlAgent
    cfg = Config.from_dict({"model": {"path": str(tiny_checkpoint("llava")),
                                      "max_model_len": 256},
                            "cache": {"block_size": 4, "num_blocks": 64},
                            "timeouts": {"kv_transfer_s": 0.5}})
    ctx = SimpleNamespace(rank=3, config=cfg, device="cpu", nixl=NixlAgent("decode-drain"))
    w = DecodeWorker(ctx)
    in_flight: set[int] = set()
    released: list[int] = []
    ctx.nixl.done = lambda h: h not in in_flight           # the READ's progress, by hand
    ctx.nixl.release = lambda h: released.append(h)
    yield w, in_flight, released
    ctx.nixl.close()


def _pull(w, rid: str, handles: list[int], prompt_len: int = 30):
    from mmhpc.engine.sequence import SamplingParams
    from mmhpc.roles.decode import _Pull
    blocks = w.engine.add_prefilled_request(rid, list(range(10, 10 + prompt_len)),
                                            SamplingParams(max_tokens=4), 7)
    msg = SimpleNamespace(request_id=rid, prefill_rank=1, frontend_rank=0)
    w.pulls[rid] = _Pull(msg, list(handles), time.time() + 60)
    return blocks


def test_aborted_pull_holds_its_blocks_until_the_read_is_over(worker):
    w, in_flight, released = worker
    bm = w.engine.scheduler.block_manager
    free = bm.num_free_blocks
    blocks = _pull(w, "a", [1, 2])
    in_flight.add(2)                                       # READ 1 done, READ 2 still landing
    w._drop("a")                                           # AbortRequest mid-transfer
    assert "a" not in w.engine.requests and not w.pulls
    assert bm.num_free_blocks == free - len(blocks)        # still held
    assert w.transfers_in_flight()
    other = _pull(w, "b", [])                              # the next arrival gets other blocks
    assert not set(other) & set(blocks)
    w._poll_drains()
    assert bm.num_free_blocks == free - len(blocks) - len(other)
    in_flight.discard(2)                                   # the READ is over
    w._poll_drains()
    assert not w.draining and bm.num_free_blocks == free - len(other)
    assert released == []                                  # finished handles: nothing to cancel


def test_finished_pull_frees_at_once_and_a_stuck_one_after_the_grace(worker):
    w, in_flight, released = worker
    bm = w.engine.scheduler.block_manager
    free = bm.num_free_blocks
    _pull(w, "a", [1])
    w._drop("a")                                           # nothing in flight: freed now
    assert not w.draining and bm.num_free_blocks == free
    blocks = _pull(w, "b", [5])
    in_flight.add(5)
    w.pulls["b"].deadline = time.time() - 1                # the pull timed out
    w._poll_pulls()
    assert "b" not in w.engine.requests and len(w.draining) == 1
    assert bm.num_free_blocks == free - len(blocks)
    w.draining[0].deadline = time.time() - 1               # ... and is still landing later
    w._poll_drains()
    assert released == [5] and not w.draining and bm.num_free_blocks == free


def test_timed_out_embedding_read_keeps_its_landing_rows(tmp_path):
    from mmhpc.roles.embed_pool import EmbeddingPool
    from mmhpc.roles.prefill import PrefillWorker, _Read
    from mmhpc.tools.tiny import tiny_checkpoint
    from mmhpc.transport.nixl_agent import NixlAgent
    cfg = Config.from_dict({"model": {"path": str(tiny_checkpoint("llava")),
                                      "max_model_len": 256},
                            "cache": {"block_size": 4, "num_blocks": 64},
                            "timeouts": {"kv_transfer_s": 0.5}})
    ctx = SimpleNamespace(rank=1, config=cfg, device="cpu", nixl=NixlAgent("prefill-drain"),
                          layout=SimpleNamespace(frontend_rank=0))
    try:
        w = PrefillWorker(ctx)
        w.landing = EmbeddingPool(w.hidden_size, w.engine.dtype, 512, device="cpu")
        in_flight, released = set(), []
        ctx.nixl.done = lambda h: h not in in_flight
        ctx.nixl.release = lambda h: released.append(h)
        total = w.landing.num_free_rows
        for handle in (9, 10):
            start = w.landing.alloc(8)
            msg = SimpleNamespace(num_tokens=8, encode_rank=2, content_hash=f"h{handle}")
            w.reads.append(_Read(f"r{handle}", msg, handle, start, time.time() - 1))
            in_flight.add(handle)
        w._poll_reads()                          # both past their deadline: requests failed
        sent = []
        while not w.outbox.empty():
            sent.append(w.outbox.get_nowait()[1])
        failed = [m for m in sent if type(m).__name__ == "RequestFailed"]
        assert sorted(m.request_id for m in failed) == ["r10", "r9"]
        assert all(m.timeout and "timed out" in m.message for m in failed)
        assert len(w.reads) == 2 and all(r.timed_out for r in w.reads)
        assert w.landing.num_free_rows == total - 16          # rows still taken
        in_flight.discard(9)                                  # READ 9 is over
        w._poll_reads()
        assert [r.request_id for r in w.reads] == ["r10"] and w.landing.num_free_rows == total - 8
        w.reads[0].deadline = time.time() - 1                 # READ 10 outlives its grace
        w._poll_reads()
        assert not w.reads and released == [10] and w.landing.num_free_rows == total
    finally:
        ctx.nixl.close()

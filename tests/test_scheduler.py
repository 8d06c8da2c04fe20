"""Scheduler: continuous batching, chunked prefill, preemption, disaggregation paths."""
import pytest

from mmhpc.engine.scheduler import check_stop
from mmhpc.engine.sequence import FinishReason, SequenceStatus
from tests.helpers_engine import (EOS, check_invariants, expected_output, fake_token,
                                  make_scheduler, make_seq, run_to_completion)


def step(sched, finish_stops=True):
    out = sched.schedule()
    check_invariants(sched)
    sampled = {s.seq.request_id: fake_token(s.seq) for s in out.scheduled if s.sample}
    for seq in sched.update(out, sampled):
        reason = sched.check_stop(seq)
        if finish_stops and reason is not None:
            sched.finish(seq, reason)
    return out


def plan(out):
    return [(s.seq.request_id, s.num_new_tokens, s.is_prefill) for s in out.scheduled]


def test_chunked_prefill_under_token_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add(make_seq("a", 20, max_tokens=2))
    assert plan(step(sched)) == [("a", 8, True)]
    assert plan(step(sched)) == [("a", 8, True)]
    out = step(sched)
    assert plan(out) == [("a", 4, True)] and out.scheduled[0].sample
    assert plan(step(sched)) == [("a", 1, False)]
    assert not sched.has_unfinished()


def test_no_chunking_waits_for_budget_and_rejects_oversize_prompt():
    sched = make_scheduler(max_num_batched_tokens=8, chunked=False)
    sched.add(make_seq("a", 6, max_tokens=3))
    sched.add(make_seq("b", 6, start=200))
    sched.add(make_seq("c", 9, start=300))
    assert plan(step(sched)) == [("a", 6, True)]
    # a decodes (1); b's 6 fits in the remaining 7
    out = step(sched)
    assert plan(out) == [("a", 1, False), ("b", 6, True)]
    assert [s.finish_reason for s in out.finished] == [FinishReason.ERROR]
    assert "max_num_batched_tokens" in out.finished[0].error


def test_decode_and_prefill_share_a_step_decodes_first():
    sched = make_scheduler(max_num_batched_tokens=10)
    sched.add(make_seq("a", 4, max_tokens=5))
    step(sched)
    sched.add(make_seq("b", 30))
    out = step(sched)
    assert plan(out) == [("a", 1, False), ("b", 9, True)]
    assert out.num_batched_tokens == 10


def test_join_and_leave_between_steps():
    sched = make_scheduler()
    sched.add(make_seq("a", 4, max_tokens=2))
    sched.add(make_seq("b", 4, max_tokens=4))
    step(sched)
    step(sched)                                  # a reaches max_tokens and leaves
    assert [s.request_id for s in sched.running] == ["b"]
    sched.add(make_seq("c", 3))
    assert plan(step(sched)) == [("b", 1, False), ("c", 3, True)]
    assert sched.num_running == 2 and sched.num_waiting == 0


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(4):
        sched.add(make_seq(i, 3, max_tokens=3))
    assert [r for r, *_ in plan(step(sched))] == ["0", "1"]
    assert sched.num_waiting == 2


def test_preemption_with_tiny_pool_every_request_finishes():
    sched = make_scheduler(num_blocks=10, block_size=4, max_num_seqs=8, max_num_batched_tokens=16)
    seqs = [make_seq(i, 5 + i, max_tokens=12, start=10 * i) for i in range(6)]
    for seq in seqs:
        sched.add(seq)
    outs = run_to_completion(sched)
    assert any(out.preempted for out in outs)
    assert sum(s.num_preemptions for s in seqs) > 0
    for seq in seqs:
        assert seq.finish_reason == FinishReason.LENGTH
        assert seq.output_token_ids == expected_output(seq.prompt_token_ids, 12)
    assert sched.block_manager.num_free_blocks == 10


@pytest.mark.parametrize("num_blocks", [10, 64])
def test_lookahead_slot_for_decode_ahead(num_blocks):
    """With lookahead (CUDA decode ahead), a decode also holds the block of its next token when
    a block is spare: same outputs, same invariants; with a tiny pool it never preempts more."""
    runs = {}
    for lookahead in (False, True):
        sched = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_seqs=8,
                               max_num_batched_tokens=16, lookahead=lookahead)
        seqs = [make_seq(i, 5 + i, max_tokens=12, start=10 * i) for i in range(6)]
        for seq in seqs:
            sched.add(seq)
        outs = []
        for out in run_to_completion(sched):
            outs.append(out)
            for s in out.scheduled:          # the block of the next token is already there
                if lookahead and num_blocks == 64 and not s.is_prefill:
                    assert len(s.seq.block_table) * 4 >= s.start + 2 or s.seq.is_finished
        runs[lookahead] = ([s.output_token_ids for s in seqs],
                           sum(len(o.preempted) for o in outs))
        assert sched.block_manager.num_free_blocks == num_blocks
    assert runs[True][0] == runs[False][0]
    assert runs[True][0][0] == expected_output(make_seq(0, 5, start=0).prompt_token_ids, 12)
    if num_blocks == 64:
        assert runs[True][1] == runs[False][1] == 0


def test_preempted_seq_recomputes_prompt_and_output():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=32,
                           prefix_caching=False)
    a, b = make_seq("a", 7, max_tokens=20), make_seq("b", 7, max_tokens=20)
    sched.add(a)
    sched.add(b)
    step(sched)
    while not any(s.num_preemptions for s in (a, b)):
        out = step(sched)
    assert out.preempted == ["b"] and b.status == SequenceStatus.WAITING
    assert sched.waiting[0] is b and b.block_table == [] and b.num_computed_tokens == 0
    num_out = len(b.output_token_ids)
    while b.status != SequenceStatus.RUNNING:
        out = step(sched)
    (sb,) = [s for s in out.scheduled if s.seq is b]
    assert sb.is_prefill and sb.num_new_tokens == 7 + num_out and sb.sample


def test_oversize_request_finishes_with_error():
    sched = make_scheduler(num_blocks=4, block_size=4)
    sched.add(make_seq("big", 17))
    sched.add(make_seq("ok", 3))
    out = sched.schedule()
    assert [s.request_id for s in out.finished] == ["big"]
    assert out.finished[0].finish_reason == FinishReason.ERROR and "pool" in out.finished[0].error
    assert plan(out) == [("ok", 3, True)]


def test_request_outgrowing_the_pool_fails_not_loops():
    sched = make_scheduler(num_blocks=3, block_size=4)
    seq = make_seq("grow", 10, max_tokens=50)
    sched.add(seq)
    run_to_completion(sched, max_steps=100)
    assert seq.finish_reason == FinishReason.ERROR and len(seq.output_token_ids) == 3
    assert sched.block_manager.num_free_blocks == 3


def test_abort_frees_blocks_everywhere():
    sched = make_scheduler(num_blocks=16)
    sched.add(make_seq("a", 9))
    sched.add(make_seq("b", 9))
    out = sched.schedule()
    assert sched.abort("a").finish_reason == FinishReason.ABORT
    assert sched.abort("nope") is None
    sched.update(out, {"a": 5, "b": 6})          # a was aborted mid-step: ignored
    check_invariants(sched)
    assert sched.abort("b") is not None
    assert sched.block_manager.num_free_blocks == 16 and not sched.has_unfinished()


def test_prefix_hit_reported_and_skipped():
    sched = make_scheduler(block_size=4)
    sched.add(make_seq("a", 10, max_tokens=1))
    run_to_completion(sched)
    b = make_seq("b", 10, max_tokens=1)
    sched.add(b)
    out = sched.schedule()
    assert plan(out) == [("b", 2, True)] and out.scheduled[0].start == 8
    assert b.num_cached_tokens == 8


def test_remote_reserve_then_activate():
    sched = make_scheduler(num_blocks=8, block_size=4)
    seq = make_seq("r", 9, max_tokens=3)
    seq.output_token_ids.append(fake_token(seq))     # first token came from prefill
    ids = sched.reserve_remote(seq)
    assert ids == seq.block_table and len(ids) == 3  # KV of the 9 prompt tokens
    assert sched.schedule().is_empty and sched.has_unfinished()
    check_invariants(sched)
    sched.activate_remote("r")
    assert plan(step(sched)) == [("r", 1, False)]
    run_to_completion(sched)
    assert seq.output_token_ids == expected_output(seq.prompt_token_ids, 3)
    assert sched.block_manager.num_free_blocks == 8


def test_remote_reserve_refuses_when_full_and_errors_when_never():
    sched = make_scheduler(num_blocks=4, block_size=4)
    big = make_seq("big", 20)
    big.output_token_ids.append(7)
    assert sched.reserve_remote(big) is None and big.finish_reason == FinishReason.ERROR
    a = make_seq("a", 12)
    a.output_token_ids.append(7)
    assert sched.reserve_remote(a) is not None
    b = make_seq("b", 8)
    b.output_token_ids.append(7)
    assert sched.reserve_remote(b) is None and b.finish_reason is None   # later
    assert sched.abort("a") is not None
    assert sched.reserve_remote(b) is not None


def test_prefill_only_retains_until_release():
    sched = make_scheduler(num_blocks=8, block_size=4)
    seq = make_seq("p", 9, max_tokens=1)
    sched.add(seq)
    out = sched.schedule()
    (got,) = sched.update(out, {"p": 42})
    sched.finish(got, FinishReason.LENGTH, retain_blocks=True)
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 5
    assert sched.block_manager.block_ids(seq) == seq.block_table
    check_invariants(sched)
    assert sched.release("p") and not sched.release("p")
    assert sched.block_manager.num_free_blocks == 8


def test_check_stop():
    seq = make_seq("s", 3, max_tokens=4, min_tokens=2)
    seq.output_token_ids = [EOS]
    assert check_stop(seq, [EOS]) is None                         # min_tokens
    seq.output_token_ids = [5, EOS]
    assert check_stop(seq, [EOS]) == FinishReason.STOP
    seq.params.ignore_eos = True
    assert check_stop(seq, [EOS]) is None
    seq.params.stop_token_ids = [9]
    seq.output_token_ids = [5, 9]
    assert check_stop(seq, [EOS]) == FinishReason.STOP
    seq.output_token_ids = [5, 6, 7, 8]
    assert check_stop(seq, [EOS]) == FinishReason.LENGTH
    seq.output_token_ids = [5, 6]
    assert check_stop(seq, [EOS], max_model_len=5) == FinishReason.LENGTH

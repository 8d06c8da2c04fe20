"""Small builders for the CPU tier of engine tests (no torch)."""
from __future__ import annotations

from mmhpc.config import CacheConfig, SchedulerConfig
from mmhpc.engine.scheduler import Scheduler
from mmhpc.engine.sequence import MMItem, SamplingParams, Sequence

EOS = 2


def make_seq(request_id: str | int, prompt_len: int, max_tokens: int = 4, *, start: int = 100,
             prompt: list[int] | None = None, mm_items: list[MMItem] | None = None,
             **params) -> Sequence:
    """A seq whose prompt is `start, start+1, ...` (never EOS) unless `prompt` is given."""
    prompt = list(prompt) if prompt is not None else list(range(start, start + prompt_len))
    return Sequence(str(request_id), prompt, SamplingParams(max_tokens=max_tokens, **params),
                    mm_items=list(mm_items or []))


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, chunked: bool = True,
                   prefix_caching: bool = True, lookahead: bool = False) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens, chunked),
                     CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching),
                     num_blocks=num_blocks, eos_token_ids=[EOS], lookahead=lookahead)


def fake_token(seq: Sequence) -> int:
    """A deterministic 'model': the next token is a function of the tokens so far (never EOS)."""
    return 1000 + (sum(seq.token_ids) + seq.num_tokens) % 97


def run_to_completion(sched: Scheduler, max_steps: int = 10_000) -> list:
    """Drive schedule → fake model → update → stop checks. Returns the SchedulerOutputs."""
    outs = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return outs
        out = sched.schedule()
        outs.append(out)
        check_invariants(sched)
        sampled = {s.seq.request_id: fake_token(s.seq) for s in out.scheduled if s.sample}
        for seq in sched.update(out, sampled):
            reason = sched.check_stop(seq)
            if reason is not None:
                sched.finish(seq, reason)
    raise AssertionError(f"not finished after {max_steps} steps: {sched.running} {sched.waiting}")


def check_invariants(sched: Scheduler) -> None:
    """Ref counts equal the number of holders; free blocks hold no references."""
    bm = sched.block_manager
    holders = [0] * bm.num_blocks
    seqs = list(sched.running) + list(sched.waiting) + list(sched.ready)
    seqs += list(sched.reserved.values()) + list(sched.retained.values())
    for seq in seqs:
        for b in seq.block_table:
            holders[b] += 1
    assert holders == bm.ref_counts, (holders, bm.ref_counts)
    assert all(bm.ref_counts[b] == 0 for b in bm.free_blocks)
    assert len(bm.free_blocks) == sum(1 for c in bm.ref_counts if c == 0)
    assert len(sched.running) <= sched.config.max_num_seqs


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    """What fake_token yields for a prompt, run alone without any scheduler."""
    seq = Sequence("x", list(prompt), SamplingParams(max_tokens=max_tokens))
    while len(seq.output_token_ids) < max_tokens:
        seq.output_token_ids.append(fake_token(seq))
    return seq.output_token_ids

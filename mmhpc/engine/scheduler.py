"""Continuous batching: which sequences run this step, and how many tokens each (no torch).

One step mixes decodes and prefill chunks under `max_num_batched_tokens`: running sequences
first (in admission order), then waiting ones FCFS. When blocks run out, the most recently
admitted running sequence that can be recomputed is preempted (its blocks are freed and on
readmission it prefills over prompt + output so far). A sequence that cannot be recomputed here
(decode side: its images' embeddings stayed on the prefill rank) is never preempted while
another can be: with none after it to preempt, it waits (skips the step, keeps its blocks, and
nothing new is admitted) while others run and free blocks; only when no running sequence can
move does the latest such one fail alone (ERROR), freeing its blocks. The engine's step is

    out = scheduler.schedule()          # what to run
    sampled = runner.run(out)           # {request_id: token} for entries with .sample
    for seq in scheduler.update(out, sampled):
        reason = scheduler.check_stop(seq)   # + stop strings, by the detokenizer
        if reason: scheduler.finish(seq, reason)

Disaggregation: the decode side calls `reserve_remote(seq)` (blocks for the prompt's KV, which
a transfer then writes) and `activate_remote(request_id)` (the KV has landed: decode it).
The prefill side finishes with `retain_blocks=True` and calls `release(request_id)` when decode
has pulled the KV (or the lease expired).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from mmhpc.config import CacheConfig, SchedulerConfig
from mmhpc.engine.block_manager import BlockManager, cdiv
from mmhpc.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int     # compute tokens [start, start + num_new_tokens) of seq.token_ids
    is_prefill: bool        # False: one generated token (a decode)
    start: int = 0          # seq.num_computed_tokens when scheduled
    sample: bool = False    # this chunk reaches the seq's last token: sample the next one


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)    # request ids sent back to waiting
    finished: list[Sequence] = field(default_factory=list)  # finished by the scheduler (ERROR)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def check_stop(seq: Sequence, eos_token_ids: Iterable[int] = (),
               max_model_len: int | None = None) -> FinishReason | None:
    """EOS / stop token ids / max_tokens / max_model_len after a new token (not stop strings)."""
    p, n = seq.params, len(seq.output_token_ids)
    if n == 0 or n < p.min_tokens:
        return None
    last = seq.output_token_ids[-1]
    if not p.ignore_eos and last in eos_token_ids:
        return FinishReason.STOP
    if last in p.stop_token_ids:
        return FinishReason.STOP
    if n >= p.max_tokens or (max_model_len is not None and seq.num_tokens >= max_model_len):
        return FinishReason.LENGTH
    return None


def recomputable(seq: Sequence) -> bool:
    """Its KV can be made again from what this rank holds (every image has pixels or
    embeddings)."""
    return all(it.pixel_values is not None or it.embeddings is not None for it in seq.mm_items)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheConfig, num_blocks: int | None = None,
                 eos_token_ids: Iterable[int] = (), max_model_len: int | None = None,
                 lookahead: bool = False):
        num_blocks = num_blocks if num_blocks is not None else cache.num_blocks
        if num_blocks is None:
            raise ValueError("Scheduler needs num_blocks (cache.num_blocks or the measured pool)")
        self.config = config
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.running: list[Sequence] = []           # admission order; preempt from the back
        self.waiting: deque[Sequence] = deque()
        self.ready: deque[Sequence] = deque()       # remote KV landed: admitted before waiting
        self.reserved: dict[str, Sequence] = {}     # blocks held, remote KV in flight
        self.retained: dict[str, Sequence] = {}     # finished, blocks kept until release()
        # Decodes also get the slot of the token after this one when a block is spare, so the
        # CUDA runner can launch the next step before this one's tokens are back (decode ahead).
        self.lookahead = lookahead

    # ---- queues ------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.ready) + len(self.reserved)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting or self.ready or self.reserved)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove the request wherever it is, free its blocks, mark it ABORT."""
        seq = self._remove(request_id)
        if seq is None:
            return None
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, FinishReason.ABORT
        return seq

    def finish(self, seq: Sequence, reason: FinishReason, retain_blocks: bool = False,
               error: str | None = None) -> None:
        """The seq is done. With retain_blocks its KV stays (prefill side) until release()."""
        self._remove(seq.request_id)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        if error is not None:
            seq.error = error
        if retain_blocks:
            self.retained[seq.request_id] = seq
        else:
            self.block_manager.free(seq)

    def release(self, request_id: str) -> bool:
        """Free a retained seq's blocks (decode pulled its KV, or its lease expired)."""
        seq = self.retained.pop(request_id, None)
        if seq is None:
            return False
        self.block_manager.free(seq)
        return True

    def _remove(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting, self.ready):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    return seq
        return self.reserved.pop(request_id, None) or self.retained.pop(request_id, None)

    # ---- disaggregated decode ----------------------------------------------------------------

    def reserve_remote(self, seq: Sequence) -> list[int] | None:
        """Step 1: blocks for the KV of all but the last token of a seq prefilled elsewhere
        (prompt + its first output token). Returns the block ids to write, in order, or None:
        not now (try again later), or never (then seq is FINISHED with ERROR: check it)."""
        bm = self.block_manager
        num_tokens = seq.num_tokens - 1
        assert seq.output_token_ids and not seq.block_table, "want a fresh, prefilled seq"
        if cdiv(seq.num_tokens, bm.block_size) > bm.num_blocks:
            self._fail(seq, f"request needs {cdiv(seq.num_tokens, bm.block_size)} KV blocks, "
                            f"the pool has {bm.num_blocks}")
            return None
        # A seq this rank cannot recompute (its images' embeddings stayed on prefill) gets the
        # blocks of its whole generation now, so it never needs preempting (unless even that
        # much could never fit beside the running seqs: then the prompt's, as for the others).
        total = num_tokens
        if not recomputable(seq):
            total = seq.num_prompt_tokens + seq.params.max_tokens - 1
            if self.max_model_len is not None:
                total = min(total, self.max_model_len)
            if cdiv(total, bm.block_size) + len(self.running) > bm.num_blocks:
                total = num_tokens
        # Leave one block per running seq so decodes are not preempted by an arrival.
        if cdiv(total, bm.block_size) + len(self.running) > bm.num_free_blocks:
            return None
        bm.allocate_for_tokens(seq, total)
        seq.status = SequenceStatus.WAITING
        self.reserved[seq.request_id] = seq
        return bm.block_ids(seq)[:cdiv(num_tokens, bm.block_size)]

    def activate_remote(self, request_id: str) -> Sequence | None:
        """Step 2: the KV is in the reserved blocks; the seq decodes from the next step."""
        seq = self.reserved.pop(request_id, None)
        if seq is not None:
            self.block_manager.mark_computed(seq, seq.num_tokens - 1)
            self.ready.append(seq)
        return seq

    # ---- the step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        bm = self.block_manager

        i = 0
        starved: list[Sequence] = []        # no block, cannot be recomputed: wait
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = seq.num_tokens - seq.num_computed_tokens
            if num_new <= 0:                # waiting for the engine to finish it
                i += 1
                continue
            if num_new > budget:
                if not chunked:
                    i += 1
                    continue
                num_new = budget
            if cdiv(seq.num_computed_tokens + num_new, bm.block_size) > bm.num_blocks:
                self.running.pop(i)
                self._fail(seq, self._too_long(seq), out)
                continue
            if not bm.can_allocate(seq, num_new) and not recomputable(seq) and \
                    not any(recomputable(q) for q in self.running[i + 1:]):
                starved.append(seq)
                i += 1
                continue
            while not bm.can_allocate(seq, num_new):
                victim = self._victim(i)
                self.running.remove(victim)
                if recomputable(victim):
                    self._preempt(victim)
                else:
                    self._fail(victim, f"request {victim.request_id} was preempted (KV blocks "
                                       f"ran out) and cannot be recomputed here: its images' "
                                       f"embeddings are not on this rank", out)
                out.preempted.append(victim.request_id)
                if victim is seq:
                    break
            else:
                self._schedule(seq, num_new, out)
                budget -= num_new
                i += 1
                continue
            break                           # seq preempted itself: nothing after it

        if starved and not out.scheduled:   # nobody can move: the latest starved one goes
            victim = starved[-1]
            self.running.remove(victim)
            self._fail(victim, f"request {victim.request_id} ran out of KV blocks and cannot be "
                               f"recomputed here (its images' embeddings are not on this "
                               f"rank)", out)
            out.preempted.append(victim.request_id)
        if not out.preempted and not starved:   # no admissions in a step that preempted
            for queue in (self.ready, self.waiting):
                budget = self._admit(queue, budget, out)
                if queue:
                    break                   # FCFS: nothing overtakes a blocked head
        return out

    def _admit(self, queue: deque[Sequence], budget: int, out: SchedulerOutput) -> int:
        """Move seqs from the head of `queue` to running while tokens, seats and blocks last."""
        bm, max_tokens = self.block_manager, self.config.max_num_batched_tokens
        while queue and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = queue[0]
            if cdiv(seq.num_tokens, bm.block_size) > bm.num_blocks:
                queue.popleft()
                self._fail(seq, self._too_long(seq), out)
                continue
            looked_up = not seq.block_table         # remote seqs arrive with their blocks
            if looked_up:
                cached = bm.lookup_prefix(seq)
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = cached
            num_new = seq.num_tokens - seq.num_computed_tokens
            if not self.config.enable_chunked_prefill and num_new > max_tokens:
                queue.popleft()
                self._fail(seq, f"prompt of {seq.num_tokens} tokens exceeds max_num_batched_"
                                f"tokens={max_tokens} with chunked prefill off", out)
                continue
            fits = num_new <= budget or self.config.enable_chunked_prefill
            num_new = min(num_new, budget)
            if not fits or not bm.can_allocate(seq, num_new):
                if looked_up:
                    bm.undo_lookup(seq)
                break
            queue.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._schedule(seq, num_new, out)
            budget -= num_new
        return budget

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """After the model ran `out`: advance computed tokens; append the sampled token of each
        seq whose chunk reached its end. Returns the seqs that got a token."""
        got: list[Sequence] = []
        for s in out.scheduled:
            seq = s.seq
            if seq.status != SequenceStatus.RUNNING or seq.num_computed_tokens != s.start:
                continue                    # aborted or finished between schedule and update
            seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_blocks(seq)
            if s.sample and seq.request_id in sampled:
                seq.output_token_ids.append(sampled[seq.request_id])
                got.append(seq)
        return got

    def check_stop(self, seq: Sequence) -> FinishReason | None:
        return check_stop(seq, self.eos_token_ids, self.max_model_len)

    def _schedule(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> None:
        bm = self.block_manager
        start = seq.num_computed_tokens
        is_decode = bool(seq.output_token_ids) and start == seq.num_tokens - 1
        ahead = (self.lookahead and is_decode and bm.num_blocks_needed(seq, num_new + 1) > 0
                 and bm.num_free_blocks > len(self.running) + 1)   # leave one per running seq
        bm.allocate(seq, num_new + ahead)
        out.scheduled.append(ScheduledSeq(seq, num_new, not is_decode, start,
                                          start + num_new == seq.num_tokens))
        out.num_batched_tokens += num_new

    def _victim(self, first: int) -> Sequence:
        """The seq to preempt among running[first:]: the latest admitted that can be
        recomputed, else the latest."""
        for seq in reversed(self.running[first:]):
            if recomputable(seq):
                return seq
        return self.running[-1]

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _fail(self, seq: Sequence, error: str, out: SchedulerOutput | None = None) -> None:
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, FinishReason.ERROR
        seq.error = error
        if out is not None:
            out.finished.append(seq)

    def _too_long(self, seq: Sequence) -> str:
        bm = self.block_manager
        return (f"request {seq.request_id} needs {cdiv(seq.num_tokens, bm.block_size)} KV blocks "
                f"of {bm.block_size} tokens ({seq.num_tokens} tokens); the pool has only "
                f"{bm.num_blocks}: raise cache.num_blocks or lower max_tokens")

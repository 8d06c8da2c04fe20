"""LLMEngine: one rank's engine, the native backend of every role's protocol
(mmhpc.engine.interface). `step()` = schedule → encode new images → run → sample →
append + stop checks → RequestOutputs. No I/O; one thread owns it.

Disaggregated roles reuse the same object:
- encode:  `LLMEngine(config, encode_only=True).encode(items)` (no KV pool, no scheduler);
- prefill: `add_request(..., prefill_only=True)`: after the first token the request leaves
  the batch with its KV blocks retained (`retained_block_ids`), until `release_request`;
- decode:  `add_prefilled_request(...)` reserves blocks for the prompt's KV and returns their
  ids; a transfer writes them into `kv_cache`; `activate_request` then lets it decode.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from mmhpc.config import Config
from mmhpc.engine.detokenizer import IncrementalDetokenizer
from mmhpc.engine.model_runner import ModelRunner
from mmhpc.engine.outputs import RequestOutput, TokenLogprob
from mmhpc.engine.sampler import Sampler
from mmhpc.engine.scheduler import Scheduler
from mmhpc.engine.sequence import FinishReason, MMItem, SamplingParams, Sequence

EXPERT_COUNTS_EVERY_S = 1.0   # stats(): MoE counts read back from the device at most this often
PROMPT_TAIL = 4        # prompt ids the detokenizer sees first (leading-space handling)


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer | None      # None: no text wanted and no stop strings
    prefill_only: bool = False


class LLMEngine:
    def __init__(self, config: Config, processor=None, encode_only: bool = False, device=None,
                 detokenize: bool = True):
        """`detokenize=False`: outputs carry token ids only (a worker rank: the frontend makes
        the text); requests with stop strings are still detokenized, to find them."""
        self.config = config
        self.detokenize = detokenize
        if processor is None:
            from mmhpc.multimodal.processor import InputProcessor
            processor = InputProcessor(config.model.path)
        self.processor = processor
        self.runner = ModelRunner(config, device=device, allocate_kv=not encode_only)
        self._moe_layers = None     # the model's MoE layers, found on the first stats()
        self._experts_read_at, self._expert_counts = float("-inf"), []
        self.encode_only = encode_only
        eos = list(processor.eos_token_ids)
        self.sampler = Sampler(eos, seed=config.model.seed)
        self.scheduler = None if encode_only else Scheduler(
            config.scheduler, config.cache, self.runner.num_blocks, eos_token_ids=eos,
            max_model_len=config.model.max_model_len,
            lookahead=self.runner.launch_ahead is not None)
        self.requests: dict[str, _Request] = {}
        self.num_preemptions = 0

    # ---- requests ----------------------------------------------------------------------------

    def _new_seq(self, request_id, prompt_token_ids, params, mm_items) -> Sequence:
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        seq = Sequence(request_id, list(prompt_token_ids), params or SamplingParams(),
                       sorted(mm_items, key=lambda it: it.offset))
        if self.runner.uses_mrope and seq.mm_items:
            seq.mrope_positions, seq.mrope_delta = self.runner.mrope_positions(
                seq.prompt_token_ids, seq.mm_items)
        return seq

    def _detok(self, seq: Sequence) -> IncrementalDetokenizer | None:
        if not self.detokenize and not seq.params.stop:
            return None
        return IncrementalDetokenizer(self.processor.tokenizer, seq.params.stop,
                                      prompt_tail=seq.prompt_token_ids[-PROMPT_TAIL:])

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | None = None, mm_items=(),
                    prefill_only: bool = False, block_hashes: list[int] | None = None) -> None:
        """Queue a request. Items with pixel values are encoded when first scheduled (batched
        across the step); items with `embeddings` are used as they are. `block_hashes`: the
        prompt's `prompt_block_hashes`, made on another thread (else the scheduler makes them)."""
        seq = self._new_seq(request_id, prompt_token_ids, params, mm_items)
        if block_hashes is not None:
            if len(block_hashes) > len(seq.prompt_token_ids) // self.scheduler.block_manager.block_size:
                raise ValueError(f"{len(block_hashes)} block hashes for a prompt of "
                                 f"{len(seq.prompt_token_ids)} tokens")
            seq.block_hashes = list(block_hashes)
        self.requests[request_id] = _Request(seq, self._detok(seq), prefill_only)
        self.scheduler.add(seq)

    def prompt_block_hashes(self, prompt_token_ids: list[int], mm_items=()) -> list[int] | None:
        """The prefix-cache hashes of a prompt for `add_request(block_hashes=...)`; thread-safe
        (pure): call it where the prompt is made (a preprocessing thread), not on the engine's.
        None: prefix caching is off."""
        if not self.scheduler.block_manager.enable_prefix_caching:
            return None
        items = sorted(mm_items, key=lambda it: it.offset)
        return self.scheduler.block_manager.prompt_hashes(list(prompt_token_ids), items)

    def abort_request(self, request_id: str) -> None:
        """Drop the request wherever it is (waiting, running, reserved, retained); frees blocks."""
        self.scheduler.abort(request_id)
        self.requests.pop(request_id, None)
        self.sampler.release(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict:
        bm = self.scheduler.block_manager
        out = dict(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                   num_free_blocks=bm.num_free_blocks, num_total_blocks=bm.num_blocks,
                   num_cached_blocks=bm.num_cached_blocks, num_preemptions=self.num_preemptions)
        if self._moe_layers is None:                     # found once: stats run every loop
            from mmhpc.models.moe import moe_layers
            self._moe_layers = moe_layers(self.runner.model)
        if self._moe_layers:                             # MoE: tokens routed to each expert
            # stats run after every step; reading the counts back is a device sync, so at most
            # once per EXPERT_COUNTS_EVERY_S (they reach /metrics with heartbeats anyway)
            now = time.monotonic()
            if now - self._experts_read_at >= EXPERT_COUNTS_EVERY_S:
                self._experts_read_at = now
                self._expert_counts = sum(m.tokens_per_expert for m in self._moe_layers).tolist()
            out["tokens_per_expert"] = self._expert_counts
        return out

    # ---- disaggregated roles -----------------------------------------------------------------

    def encode(self, mm_items: list[MMItem]) -> list[MMItem]:
        """Encode-only: embeddings of all items (one batch) set on them in place."""
        self.runner.encode(list(mm_items))
        return list(mm_items)

    def retained_block_ids(self, request_id: str) -> list[int] | None:
        """Prefill side: blocks holding a prefill-only request's prompt KV (None: not retained)."""
        seq = self.scheduler.retained.get(request_id)
        return None if seq is None else list(seq.block_table)

    def release_request(self, request_id: str) -> bool:
        """Prefill side: decode has pulled the KV (or the lease expired): free the blocks."""
        return self.scheduler.release(request_id)

    def add_prefilled_request(self, request_id: str, prompt_token_ids: list[int],
                              params: SamplingParams | None, first_token_id: int,
                              mm_items=()) -> list[int] | None:
        """Decode side: reserve blocks for the prompt's KV (prefilled elsewhere; its first
        token already sent). Returns the block ids to write, in order; None: no room now,
        try again later. Items need only offsets/grids (no pixels, no embeddings)."""
        seq = self._new_seq(request_id, prompt_token_ids, params, mm_items)
        seq.output_token_ids.append(first_token_id)
        blocks = self.scheduler.reserve_remote(seq)
        if blocks is None:
            if seq.error:
                raise ValueError(seq.error)
            return None
        detok = self._detok(seq)
        if detok is not None:
            detok.add(first_token_id)
            detok.sent = len(detok.text)       # the prefill rank streamed this text
        self.requests[request_id] = _Request(seq, detok)
        return blocks

    def hold_blocks(self, request_id: str) -> list[int]:
        """Decode side: keep a reserved request's blocks out of use past its abort (a READ
        into them may still be landing); give them back with `unhold_blocks`."""
        seq = self.scheduler.reserved.get(request_id)
        blocks = list(seq.block_table) if seq is not None else []
        self.scheduler.block_manager.hold(blocks)
        return blocks

    def unhold_blocks(self, block_ids: list[int]) -> None:
        self.scheduler.block_manager.unhold(block_ids)

    def activate_request(self, request_id: str) -> None:
        """Decode side: the reserved blocks hold the KV; decode from the next step."""
        if self.scheduler.activate_remote(request_id) is None:
            raise KeyError(f"no reserved request {request_id!r}")

    # ---- what the roles read (mmhpc.engine.interface) -----------------------------------------

    @property
    def kv_cache(self):
        return self.runner.kv_cache

    @property
    def hidden_size(self) -> int:
        return self.runner.model.text_config.hidden_size

    @property
    def deepstack_levels(self) -> int:
        return getattr(self.runner.model, "deepstack_levels", 0)

    @property
    def dtype(self):
        return self.runner.dtype

    @property
    def block_size(self) -> int | None:
        return None if self.scheduler is None else self.scheduler.block_manager.block_size

    @property
    def num_kv_heads(self) -> int:
        text = self.runner.model.text_config
        return getattr(text, "num_key_value_heads", None) or text.num_attention_heads

    @property
    def kv_block_bytes(self) -> int:
        kv = self.runner.kv_cache      # [L, 2, num_blocks, H, block_size, D]
        return kv[:, :, 0].numel() * kv.element_size()

    # ---- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.num_preemptions += len(out.preempted)
        outputs = [self._finish_output(seq, "") for seq in out.finished]
        if out.is_empty:
            return outputs
        self.runner.encode([it for s in out.scheduled for it in s.seq.mm_items
                            if it.embeddings is None and it.offset < s.start + s.num_new_tokens
                            and it.offset + it.num_tokens > s.start])
        logits, seqs = self.runner.execute(out.scheduled)
        sampled = self.sampler(logits, seqs, launch_ahead=self.runner.launch_ahead)
        for seq in self.scheduler.update(out, {rid: t for rid, (t, _) in sampled.items()}):
            token, logprob = sampled[seq.request_id]
            outputs.append(self._postprocess(seq, token, logprob))
        return outputs

    def _postprocess(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        req = self.requests[seq.request_id]
        detok = req.detok
        delta = detok.add(token) if detok is not None else ""
        stopped = detok is not None and detok.stopped
        reason = FinishReason.STOP if stopped else self.scheduler.check_stop(seq)
        out = RequestOutput(seq.request_id, [token], delta,
                            [logprob] if logprob is not None else None,
                            num_prompt_tokens=seq.num_prompt_tokens,
                            num_cached_tokens=seq.num_cached_tokens)
        if reason is not None:
            self.scheduler.finish(seq, reason)
        elif req.prefill_only:                 # hand-off: not finished for the client
            self.scheduler.finish(seq, FinishReason.LENGTH, retain_blocks=True)
            self._forget(seq.request_id)
            return out
        else:
            return out
        if detok is not None:
            out.text_delta += detok.flush()
        out.finished, out.finish_reason = True, reason.value
        self._forget(seq.request_id)
        return out

    def _finish_output(self, seq: Sequence, delta: str) -> RequestOutput:
        self._forget(seq.request_id)
        reason = seq.finish_reason.value if seq.finish_reason else None
        return RequestOutput(seq.request_id, [], delta, finished=True, finish_reason=reason,
                             num_prompt_tokens=seq.num_prompt_tokens, error=seq.error)

    def _forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self.sampler.release(request_id)

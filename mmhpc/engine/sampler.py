"""Next tokens from logits: greedy, or temperature / top-k / top-p with a per-request
`torch.Generator` (seeded by `params.seed`, so a run is reproducible), plus logprobs."""
from __future__ import annotations

import random

import torch

from mmhpc.engine.outputs import TokenLogprob
from mmhpc.engine.sequence import Sequence


class Sampler:
    def __init__(self, eos_token_ids=(), seed: int = 0):
        self.eos_token_ids = list(eos_token_ids)
        self._rng = random.Random(seed)            # seeds of requests without params.seed
        self._generators: dict[str, torch.Generator] = {}
        self._prompt_ids: dict[str, torch.Tensor] = {}   # repetition penalty: [prompt] ids
        self._pinned: torch.Tensor | None = None   # host landing buffer of the tokens (CUDA)

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._prompt_ids.pop(request_id, None)

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator:
        g = self._generators.get(seq.request_id)
        if g is None:
            seed = seq.params.seed if seq.params.seed is not None else self._rng.getrandbits(63)
            g = torch.Generator(device=device)
            g.manual_seed(seed)
            self._generators[seq.request_id] = g
        return g

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 launch_ahead=None) -> dict[str, tuple[int, TokenLogprob | None]]:
        """logits: [N, V] float32, row i for seqs[i] → {request_id: (token, logprob or None)}.
        `launch_ahead(tokens_device, tokens_host)` (CUDA, all rows greedy without logprobs): called
        once the argmax and its copy to the host are queued and before waiting for them, so the
        model runner can queue the next decode step behind them."""
        if not seqs:
            return {}
        logits = logits.float()
        masked = logits
        plain = True                    # every row greedy without logprobs: the argmax is all
        for i, seq in enumerate(seqs):
            p = seq.params
            early = len(seq.output_token_ids) < p.min_tokens   # no EOS / stop token before it
            penalized = p.penalized
            if early or penalized:
                if masked is logits:
                    masked = logits.clone()
            if early:
                ids = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                if ids:
                    masked[i, ids] = float("-inf")
            if penalized:
                self._penalize(masked[i], seq)
            if plain and not (p.greedy and p.logprobs is None):
                plain = False
        if launch_ahead is not None and logits.is_cuda and plain:
            tokens = self._argmax_then(masked, launch_ahead)
        else:
            tokens = masked.argmax(dim=-1).tolist()
        if plain:
            return {s.request_id: (t, None) for s, t in zip(seqs, tokens)}
        for i, seq in enumerate(seqs):
            p = seq.params
            if not p.greedy:
                tokens[i] = self._sample(masked[i], p, self._generator(seq, logits.device))
        result = {}
        logprobs = None
        if any(s.params.logprobs is not None for s in seqs):
            logprobs = torch.log_softmax(logits, dim=-1)
        for i, seq in enumerate(seqs):
            lp = None
            if seq.params.logprobs is not None:
                row = logprobs[i]
                k = seq.params.logprobs
                top = []
                if k:
                    vals, ids = row.topk(k)
                    top = list(zip(ids.tolist(), vals.tolist()))
                lp = TokenLogprob(tokens[i], float(row[tokens[i]]), top)
            result[seq.request_id] = (tokens[i], lp)
        return result

    def _penalize(self, row: torch.Tensor, seq: Sequence) -> None:
        """logit_bias, then the repetition, frequency and presence penalties, in place on one
        row [V] (vLLM's order and definitions; see SamplingParams). Gathers and scatters only:
        nothing here waits for the GPU (decode ahead keeps running)."""
        p, dev, vocab = seq.params, row.device, row.shape[0]
        if p.logit_bias:
            ids = [t for t in p.logit_bias if 0 <= t < vocab]
            if ids:
                row[ids] += torch.tensor([p.logit_bias[t] for t in ids], device=dev)
        repeat = p.repetition_penalty != 1.0
        counted = bool((p.frequency_penalty or p.presence_penalty) and seq.output_token_ids)
        if not (repeat or counted):
            return
        out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=dev)     # [n_out]
        if repeat:
            prompt = self._prompt_ids.get(seq.request_id)
            if prompt is None:
                prompt = torch.tensor(seq.prompt_token_ids, dtype=torch.long, device=dev)
                self._prompt_ids[seq.request_id] = prompt
            seen = torch.cat([prompt, out])             # repeats scatter the same value
            vals = row.gather(0, seen)
            row.scatter_(0, seen, torch.where(vals > 0, vals / p.repetition_penalty,
                                              vals * p.repetition_penalty))
        if counted:
            ones = torch.ones_like(out, dtype=row.dtype)
            counts = torch.zeros_like(row).scatter_add_(0, out, ones)                  # [V]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    def _argmax_then(self, logits: torch.Tensor, launch_ahead) -> list[int]:
        n = logits.shape[0]
        if self._pinned is None or self._pinned.shape[0] < n:
            self._pinned = torch.empty(max(n, 256), dtype=torch.long, pin_memory=True)
        host = self._pinned[:n]
        tokens = logits.argmax(dim=-1)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        launch_ahead(tokens, host)
        done.synchronize()
        return host.tolist()

    @staticmethod
    def _sample(row: torch.Tensor, p, generator: torch.Generator) -> int:
        row = row / p.temperature                 # [V]
        if p.min_p > 0:                           # vLLM's order: temperature, min_p, top-k, top-p
            probs = row.softmax(-1)
            row = row.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        if p.top_k > 0 and p.top_k < row.shape[-1]:
            kth = row.topk(p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_vals, order = row.sort(descending=True)
            probs = sorted_vals.softmax(-1)
            # drop a token when the mass before it already reaches top_p (keeps at least one)
            drop = probs.cumsum(-1) - probs >= p.top_p
            row = row.scatter(-1, order, sorted_vals.masked_fill(drop, float("-inf")))
        probs = row.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=generator))

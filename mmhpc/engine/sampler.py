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
        self._pinned: torch.Tensor | None = None   # host landing buffer of the tokens (CUDA)

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

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
        for i, seq in enumerate(seqs):             # min_tokens: no EOS / stop token before it
            p = seq.params
            if len(seq.output_token_ids) < p.min_tokens:
                if masked is logits:
                    masked = logits.clone()
                ids = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                if ids:
                    masked[i, ids] = float("-inf")
        if (launch_ahead is not None and logits.is_cuda
                and all(s.params.greedy and s.params.logprobs is None for s in seqs)):
            tokens = self._argmax_then(masked, launch_ahead)
        else:
            tokens = masked.argmax(dim=-1).tolist()
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

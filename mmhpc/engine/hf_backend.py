"""`engine.backend=transformers`: the aggregated role served by a Hugging Face model's own
forward (`AutoModelForImageTextToText`), like vLLM's transformers fallback: any VLM that
transformers loads, slowly but correctly. It implements `interface.AggregatedEngine`.

A step runs each running request's next forward on its own (no batching across requests),
through the model's own `generate` for ONE new token over the whole sequence so far and the
request's HF cache (`generate` computes only what the cache lacks, and prepares positions,
masks and multimodal inputs the model's way: M-RoPE, bidirectional image attention, ...):
the first call over the prompt with the image processor's outputs, each later one over the
last sampled token. Its raw logits go to the native engine's sampler, stop checks and
detokenizer, so outputs mean the same as the native engine's. Token-type inputs a
model's forward takes (`token_type_ids`, `mm_token_type_ids`) are 1 on image tokens, as
HF's processors make them for images. No paged KV, prefix cache, chunked prefill or
pre-computed embeddings; TP 1.
"""
from __future__ import annotations

import inspect
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from mmhpc.config import Config
from mmhpc.engine.detokenizer import IncrementalDetokenizer
from mmhpc.engine.outputs import RequestOutput, TokenLogprob
from mmhpc.engine.sampler import Sampler
from mmhpc.engine.scheduler import check_stop
from mmhpc.engine.sequence import FinishReason, MMItem, SamplingParams, Sequence

log = logging.getLogger(__name__)
PROMPT_TAIL = 4
TOKEN_TYPE_INPUTS = ("token_type_ids", "mm_token_type_ids")
# Per-request state some HF models keep on the module between forwards (Qwen2-VL's M-RoPE
# offset of generated positions): saved after a request's forward, restored before its next.
MODEL_STATE = ("rope_deltas",)


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer | None
    cache: Any = None                   # the HF cache (past_key_values) after its last forward
    state: dict | None = None           # MODEL_STATE values of this request


class TransformersEngine:
    block_size = None                   # no prefix caching

    def __init__(self, config: Config, processor=None, device=None, detokenize: bool = True):
        from transformers import AutoConfig, AutoModelForImageTextToText

        from mmhpc.engine.model_runner import default_device
        from mmhpc.models import resolve_dtype
        self.config = config
        self.detokenize = detokenize
        if processor is None:
            from mmhpc.multimodal.processor import InputProcessor
            processor = InputProcessor(config.model.path, kind="hf")
        self.processor = processor
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        torch.manual_seed(config.model.seed)
        if config.model.random_weights:
            hf_config = AutoConfig.from_pretrained(config.model.path)
            model = AutoModelForImageTextToText.from_config(hf_config, dtype=self.dtype)
        else:
            model = AutoModelForImageTextToText.from_pretrained(config.model.path, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.hidden_size: int = self.model.config.get_text_config().hidden_size
        self.deepstack_levels = 0           # embeddings only (mmhpc.engine.interface)
        self._inputs = set(inspect.signature(self.model.forward).parameters)
        self._state_owner = getattr(self.model, "model", self.model)
        # transformers >= 5.2x names the cache argument `cache` (`past_key_values` before)
        self._cache_arg = "cache" if "cache" in self._inputs else "past_key_values"
        eos = list(processor.eos_token_ids)
        self.eos_token_ids = set(eos)
        self.sampler = Sampler(eos, seed=config.model.seed)
        self.max_model_len = config.model.max_model_len
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.requests: dict[str, _Request] = {}
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | None = None, mm_items=(),
                    prefill_only: bool = False, block_hashes: list[int] | None = None) -> None:
        if prefill_only:
            raise ValueError("engine.backend=transformers serves the aggregated role only")
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if not prompt_token_ids:
            raise ValueError("empty prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens; "
                             f"model.max_model_len is {self.max_model_len}")
        items = sorted(mm_items, key=lambda it: it.offset)
        if any(not isinstance(it.pixel_values, dict) for it in items):
            raise ValueError("engine.backend=transformers takes images preprocessed by HF's "
                             "processor (no pre-computed embeddings)")
        seq = Sequence(request_id, list(prompt_token_ids), params or SamplingParams(), items)
        detok = None
        if self.detokenize or seq.params.stop:
            detok = IncrementalDetokenizer(self.processor.tokenizer, seq.params.stop,
                                           prompt_tail=seq.prompt_token_ids[-PROMPT_TAIL:])
        req = _Request(seq, detok)
        self.requests[request_id] = req
        self.waiting.append(req)

    def prompt_block_hashes(self, prompt_token_ids: list[int], mm_items=()) -> None:
        return None

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            if req in self.running:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
        self.sampler.release(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> dict:
        return dict(num_running=len(self.running), num_waiting=len(self.waiting),
                    num_free_blocks=0, num_total_blocks=0, num_cached_blocks=0,
                    num_preemptions=0)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.popleft())
        outputs = []
        for req in list(self.running):
            try:
                logits = self._forward(req)                          # [1, V] float32
                token, logprob = self.sampler(logits, [req.seq])[req.seq.request_id]
            except Exception as e:  # noqa: BLE001 - this request fails alone
                log.exception("transformers backend: request %s failed", req.seq.request_id)
                self._forget(req)
                outputs.append(RequestOutput(req.seq.request_id, [], finished=True,
                                             finish_reason="error",
                                             num_prompt_tokens=req.seq.num_prompt_tokens,
                                             error=f"engine error: {type(e).__name__}: {e}"))
                continue
            outputs.append(self._postprocess(req, token, logprob))
        return outputs

    @torch.inference_mode()
    def _forward(self, req: _Request) -> torch.Tensor:
        """Logits [1, V] of the request's next token; its cache grows in place."""
        from transformers import DynamicCache
        seq = req.seq
        ids = torch.tensor([seq.token_ids], device=self.device)         # [1, num_tokens]
        kw: dict[str, Any] = {}
        if req.cache is None:                            # the prompt, with its images
            req.cache = DynamicCache(config=self.model.config)
            kw = self._mm_inputs(seq.mm_items, ids)
        kw[self._cache_arg] = req.cache
        self._restore_state(req)
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
            min_new_tokens=0, do_sample=False, num_beams=1, output_logits=True,
            return_dict_in_generate=True, **kw)
        req.state = {k: getattr(self._state_owner, k) for k in MODEL_STATE
                     if hasattr(self._state_owner, k)}
        return out.logits[0].float()

    def _restore_state(self, req: _Request) -> None:
        for k in MODEL_STATE:
            if hasattr(self._state_owner, k):
                setattr(self._state_owner, k, (req.state or {}).get(k))

    def _mm_inputs(self, items: list[MMItem], ids: torch.Tensor) -> dict:
        """The image processor's outputs of every image, concatenated in prompt order, for the
        keys the model's forward takes; token types: 1 on image tokens."""
        if not items:
            return {}
        kw: dict[str, Any] = {}
        for key in items[0].pixel_values:
            if key in self._inputs:
                t = torch.cat([torch.as_tensor(it.pixel_values[key]) for it in items])
                kw[key] = t.to(self.device, self.dtype if t.is_floating_point() else None)
        for key in TOKEN_TYPE_INPUTS:
            if key in self._inputs:
                kw[key] = (ids == self.processor.image_token_id).long()     # [1, T]
        return kw

    def _postprocess(self, req: _Request, token: int, logprob: TokenLogprob | None
                     ) -> RequestOutput:
        seq = req.seq
        seq.output_token_ids.append(token)
        delta = req.detok.add(token) if req.detok is not None else ""
        stopped = req.detok is not None and req.detok.stopped
        reason = FinishReason.STOP if stopped else check_stop(seq, self.eos_token_ids,
                                                               self.max_model_len)
        out = RequestOutput(seq.request_id, [token], delta,
                            [logprob] if logprob is not None else None,
                            num_prompt_tokens=seq.num_prompt_tokens)
        if reason is not None:
            if req.detok is not None:
                out.text_delta += req.detok.flush()
            out.finished, out.finish_reason = True, reason.value
            self._forget(req)
        return out

    def _forget(self, req: _Request) -> None:
        self.abort_request(req.seq.request_id)

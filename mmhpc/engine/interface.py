"""What a role may ask of its engine: one Protocol per role. The roles (mmhpc.roles.*) and the
frontend's LocalEngineClient use these methods and attributes only, so any engine that
implements a role's protocol serves that role (docs/ENGINE.md: the request's life, and what
each backend implements). `make_engine` picks the backend (`engine.backend`).

Every method runs on the one thread that owns the engine; none does network I/O. Images enter
as `MMItem`s made by the engine's own `processor` (pixel values + grid, or embeddings).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from mmhpc.engine.outputs import RequestOutput
from mmhpc.engine.sequence import MMItem, SamplingParams


@runtime_checkable
class EncodeEngine(Protocol):
    """encode: images → embeddings (the role copies them into its registered pool)."""

    processor: Any              # multimodal.processor.InputProcessor: image_item, embedding_item
    hidden_size: int            # embedding width
    deepstack_levels: int       # L: per-layer feature blocks after the embeddings in a row
                                # (Qwen3-VL's DeepStack; 0: none); the pool's row size is
                                # hidden_size * (1 + L)
    dtype: torch.dtype          # the pool's element type

    def encode(self, mm_items: list[MMItem]) -> list[MMItem]:
        """Embeddings [num_tokens, hidden * (1 + L)] of every item (one batch), set on them in
        place."""


@runtime_checkable
class GenerateEngine(Protocol):
    """What every token-producing role uses: requests in, `RequestOutput`s per step out."""

    processor: Any
    hidden_size: int
    deepstack_levels: int       # as EncodeEngine's: image rows are hidden * (1 + L) wide
    dtype: torch.dtype
    block_size: int | None      # the prefix-cache block size; None: no prefix caching

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | None = None, mm_items=(),
                    prefill_only: bool = False, block_hashes: list[int] | None = None) -> None:
        """Queue a request; ValueError for a bad one (it fails alone)."""

    def prompt_block_hashes(self, prompt_token_ids: list[int], mm_items=()) -> list[int] | None:
        """The prompt's prefix-cache hashes for `add_request(block_hashes=...)`, thread-safe;
        None: this engine does not cache prefixes."""

    def step(self) -> list[RequestOutput]:
        """One step: each output is a request's new token(s) (`finished` on its last)."""

    def abort_request(self, request_id: str) -> None:
        """Drop the request wherever it is and free what it holds (unknown: no-op)."""

    def has_unfinished_requests(self) -> bool: ...

    def stats(self) -> dict:
        """num_running, num_waiting, num_free_blocks, num_total_blocks, ... (Heartbeat); MoE
        models add tokens_per_expert ([E], summed over layers: /metrics)."""


@runtime_checkable
class AggregatedEngine(GenerateEngine, Protocol):
    """aggregated: prompt + images → token stream, all in this engine."""


@runtime_checkable
class PrefillEngine(GenerateEngine, Protocol):
    """prefill: prompt + embeddings → first token + KV handles (`add_request(prefill_only=True)`:
    after its first token the request leaves the batch, its KV blocks retained)."""

    kv_cache: torch.Tensor      # the KV pool the role registers with NIXL (decode READs it)

    def retained_block_ids(self, request_id: str) -> list[int] | None:
        """The KV handles: block ids of the pool holding the prompt's KV (None: not held)."""

    def release_request(self, request_id: str) -> bool:
        """Decode has pulled the KV (or the lease expired): free the blocks."""


@runtime_checkable
class DecodeEngine(GenerateEngine, Protocol):
    """decode: KV handles → token stream. Reserve blocks, let a transfer fill them, activate."""

    kv_cache: torch.Tensor      # [num_layers, 2, num_blocks, kv_heads, block_size, head_dim]
    num_kv_heads: int           # KV heads of the whole model (TP ranks hold a share)
    kv_block_bytes: int         # bytes of one block on this rank, every layer, k and v

    def add_prefilled_request(self, request_id: str, prompt_token_ids: list[int],
                              params: SamplingParams | None, first_token_id: int,
                              mm_items=()) -> list[int] | None:
        """Reserve blocks for a prompt prefilled elsewhere; their ids in order (the transfer's
        destination), or None: no room now."""

    def activate_request(self, request_id: str) -> None:
        """The reserved blocks hold the KV: decode from the next step."""

    def hold_blocks(self, request_id: str) -> list[int]:
        """Keep a reserved request's blocks out of use past its abort (a READ may still land)."""

    def unhold_blocks(self, block_ids: list[int]) -> None: ...


ROLE_PROTOCOLS = {"encode": EncodeEngine, "prefill": PrefillEngine, "decode": DecodeEngine,
                  "aggregated": AggregatedEngine}
BACKENDS = ("native", "transformers")


def make_engine(config, role: str, device=None, detokenize: bool = True):
    """The engine of `role` ("encode" | "prefill" | "decode" | "aggregated") for
    `config.engine.backend`: "native" (LLMEngine) or "transformers" (aggregated only)."""
    backend = config.engine.backend
    if backend == "transformers":
        if role != "aggregated":
            raise ValueError(f"engine.backend=transformers serves the aggregated role only, "
                             f"not {role}")
        from mmhpc.engine.hf_backend import TransformersEngine
        return TransformersEngine(config, device=device, detokenize=detokenize)
    from mmhpc.engine.engine import LLMEngine
    return LLMEngine(config, encode_only=role == "encode", device=device, detokenize=detokenize)

"""What the engine hands back after a step, per request (no torch)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # (token_id, logprob), best first


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str = ""                       # incremental detokenization of new_token_ids
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None           # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0                 # image tokens included
    num_cached_tokens: int = 0                 # prompt tokens served from the prefix cache
    error: str | None = None

"""Messages the frontend (rank 0) receives: tokens, errors, load reports (Heartbeat)."""
from __future__ import annotations

from dataclasses import dataclass

from mmhpc.engine.outputs import TokenLogprob
from mmhpc.transport.codec import register


@register
@dataclass
class TokenStream:
    """New tokens of one request (prefill sends the first, decode the rest)."""
    request_id: str
    new_token_ids: list[int]
    stage: str                         # "prefill" | "decode" | "aggregated"
    finished: bool = False
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error"
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None

    @classmethod
    def of(cls, out, stage: str) -> "TokenStream":
        """The message for one engine `RequestOutput` of this stage."""
        return cls(out.request_id, out.new_token_ids, stage, out.finished, out.finish_reason,
                   out.logprobs, out.num_prompt_tokens, out.num_cached_tokens, out.error)


@register
@dataclass
class RequestFailed:
    request_id: str
    rank: int
    stage: str                         # "encode" | "prefill" | "decode"
    message: str
    timeout: bool = False
    status: int = 0                    # the HTTP status for the client (0: 500, 504 timeout)

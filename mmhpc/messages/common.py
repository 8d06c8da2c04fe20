"""Messages any rank may receive, and the shared pieces of the others."""
from __future__ import annotations

from dataclasses import dataclass, field

from mmhpc.engine.outputs import TokenLogprob
from mmhpc.engine.sequence import SamplingParams
from mmhpc.transport.codec import register
from mmhpc.transport.descs import NixlDescs  # noqa: F401  (registered there)

register(SamplingParams)
register(TokenLogprob)


@register
@dataclass
class MMItemMeta:
    """An image's place in the prompt, without pixels or embeddings."""
    content_hash: str                  # sha256 hex over the decoded content
    offset: int                        # first placeholder token in the prompt
    num_tokens: int
    grid_thw: list[int] | None = None  # Qwen2-VL (t, h, w) in patches


@register
@dataclass
class AbortRequest:
    """Cancel or timeout: free everything held for `request_id` (any stage)."""
    request_id: str
    reason: str = "abort"              # "abort" | "timeout" | "error"


@register
@dataclass
class Heartbeat:
    rank: int
    role: str
    time: float                        # sender's time.time()
    stats: dict = field(default_factory=dict)   # num_running, num_waiting, num_free_blocks, ...


@register
@dataclass
class Shutdown:
    reason: str = ""

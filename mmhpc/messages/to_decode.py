"""Messages the decode role receives (from prefill)."""
from __future__ import annotations

from dataclasses import dataclass, field

from mmhpc.engine.sequence import SamplingParams
from mmhpc.messages.common import MMItemMeta
from mmhpc.transport.codec import register
from mmhpc.transport.descs import NixlDescs


@register
@dataclass
class KVReady:
    """Prefill holds the request's KV in `block_ids` of its pool: decode READs them (pulls),
    then sends ReleaseKV. Unclaimed blocks are freed at `lease_expires`.

    The pool is `[num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim]` per prefill
    TP rank; `pools[i]` describes prefill TP rank i's registered pool (one region each) and
    `agents[i]` its NIXL agent name."""
    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int                # sampled by prefill (already streamed to the frontend)
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    agents: list[str]
    pools: list[NixlDescs]
    prefill_rank: int
    deadline: float                    # the request's, absolute time.time()
    lease_expires: float
    mm_items: list[MMItemMeta] = field(default_factory=list)
    mrope_delta: int = 0               # Qwen2-VL: generated position = index + mrope_delta
    num_cached_tokens: int = 0
    frontend_rank: int = 0

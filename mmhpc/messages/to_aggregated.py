"""Messages the aggregated role receives (from the frontend): one engine does it all."""
from __future__ import annotations

from dataclasses import dataclass, field

from mmhpc.engine.sequence import SamplingParams
from mmhpc.messages.common import MMItemMeta
from mmhpc.messages.to_encode import ImageItem
from mmhpc.transport.codec import register


@register
@dataclass
class GenerateRequest:
    """Encode, prefill and decode here; tokens go back as TokenStream(stage="aggregated")."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    mm_items: list[MMItemMeta]
    images: list[ImageItem] = field(default_factory=list)   # one per mm_item, same order
    deadline: float = 0.0              # absolute time.time()
    frontend_rank: int = 0
    # the prompt's prefix-cache block hashes (`block_manager.pack_hashes`), made by the
    # frontend at `hash_block_size` tokens a block (0: none; the engine makes its own)
    block_hashes: bytes = b""
    hash_block_size: int = 0

"""Messages the prefill role receives (requests from the frontend, embeddings from encode,
releases from decode)."""
from __future__ import annotations

from dataclasses import dataclass, field

from mmhpc.engine.sequence import SamplingParams
from mmhpc.messages.common import MMItemMeta
from mmhpc.messages.to_encode import ImageItem
from mmhpc.transport.codec import register
from mmhpc.transport.descs import NixlDescs


@register
@dataclass
class PrefillRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    mm_items: list[MMItemMeta]
    decode_rank: int                   # where KVReady goes
    deadline: float                    # absolute time.time()
    encode_rank: int = -1              # -1: embeddings come from `images` (ep_d: prefill encodes)
    images: list[ImageItem] = field(default_factory=list)
    frontend_rank: int = 0
    # the prompt's prefix-cache block hashes (`block_manager.pack_hashes`), made by the
    # frontend at `hash_block_size` tokens a block (0: none; the engine makes its own)
    block_hashes: bytes = b""
    hash_block_size: int = 0


@register
@dataclass
class EmbeddingsReady:
    """Embeddings of one item sit in encode's NIXL-registered buffer: READ them, then send
    ReleaseEmbeddings. `grid_thw` (and `mrope_*`) let prefill/decode build M-RoPE positions
    without the image."""
    request_id: str
    content_hash: str
    descs: NixlDescs                   # [num_tokens, hidden_size] rows, contiguous
    num_tokens: int
    hidden_size: int                   # row width: hidden x (1 + DeepStack levels), Qwen3-VL's
                                       # per-layer features in the same rows
    dtype: str                         # "float32" | "bfloat16" | "float16"
    encode_rank: int
    grid_thw: list[int] | None = None  # (t, h, w) in patches, before spatial merge
    spatial_merge_size: int = 1


@register
@dataclass
class ReleaseKV:
    """Decode has pulled the KV of `request_id` (or gave up): free the blocks."""
    request_id: str
    decode_rank: int

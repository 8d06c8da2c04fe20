"""Messages the encode role receives (from the frontend, and releases from prefill)."""
from __future__ import annotations

from dataclasses import dataclass, field

from mmhpc.transport.codec import register


@register
@dataclass
class ImageItem:
    """One image to encode. The frontend has fetched, checked and hashed it; the bytes ride
    ZeroMQ (media, not tensors). A pre-computed embeddings file (checked by the frontend too)
    is loaded again, with the same safe loader, by the rank that encodes: a local file by
    `path` (re-checked there against media.allowed_local_path), a fetched one by its bytes."""
    content_hash: str                  # embeddings: tensor_hash of the loaded float32 tensor
    offset: int
    num_tokens: int
    data: bytes = b""                  # "rgb": RGB8 pixels, "embedding_bytes": the
                                       # .pt/.pth/.bin/.safetensors file's bytes
    format: str = "rgb"                # "rgb" | "embedding_file" | "embedding_bytes"
    width: int = 0
    height: int = 0
    path: str = ""                     # "embedding_file": the file, inside allowed_local_path;
                                       # "embedding_bytes": its name (the suffix picks the parser)


@register
@dataclass
class EncodeRequest:
    request_id: str
    items: list[ImageItem]
    prefill_rank: int                  # where EmbeddingsReady goes
    deadline: float                    # absolute time.time(); drop the work after it
    frontend_rank: int = 0


@register
@dataclass
class ReleaseEmbeddings:
    """Prefill has read these embeddings (or gave up): unpin them (they may stay cached)."""
    request_id: str
    content_hashes: list[str] = field(default_factory=list)

"""Messages the encode role receives (from the frontend, and releases from prefill)."""
from __future__ import annotations

from dataclasses import dataclass, field

from mmhpc.transport.codec import register


@register
@dataclass
class ImageItem:
    """One image to encode. The frontend has fetched and hashed it; the bytes ride ZeroMQ
    (media, not tensors). A pre-computed embedding file is named by `path` instead."""
    content_hash: str
    offset: int
    num_tokens: int
    data: bytes = b""                  # encoded file bytes (format="encoded") or raw RGB8
    format: str = "encoded"            # "encoded" | "rgb" | "embedding_file"
    width: int = 0
    height: int = 0
    path: str = ""                     # format="embedding_file": inside media.allowed_local_path


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

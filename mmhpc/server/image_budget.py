"""The decoded media a frontend may hold: per request (media.max_request_image_mb: above it,
413) and for all requests together (media.max_inflight_image_mb: while full, 429), counted
in the bytes that are shipped on (RGB8 pixels, embedding tensors). A request holds its bytes
from decode to its end. Used on the event loop only (no lock)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from mmhpc.server.protocol import APIError

MB = 1 << 20


class ImageBudget:
    def __init__(self, media_cfg) -> None:
        self.per_request = int(media_cfg.max_request_image_mb * MB)
        self.total = int(media_cfg.max_inflight_image_mb * MB)
        self.held = 0
        self.num_refused = 0

    @staticmethod
    def size(item) -> int:
        """Bytes `item` (a PIL image or media.Embeddings) is held and shipped as."""
        if hasattr(item, "width") and hasattr(item, "height"):
            return item.width * item.height * 3
        tensor = getattr(item, "tensor", None)
        return tensor.numel() * tensor.element_size() if tensor is not None else 0

    @contextlib.contextmanager
    def hold(self) -> Iterator["_Hold"]:
        h = _Hold(self)
        try:
            yield h
        finally:
            self.held -= h.bytes


class _Hold:
    def __init__(self, budget: ImageBudget) -> None:
        self.budget = budget
        self.bytes = 0

    def take(self, num_bytes: int) -> None:
        b = self.budget
        if self.bytes + num_bytes > b.per_request:
            b.num_refused += 1
            raise APIError(413, f"the request's images decode to {self.bytes + num_bytes} bytes; "
                                f"the limit is {b.per_request} (media.max_request_image_mb)",
                           code="request_too_large")
        if b.held + num_bytes > b.total:
            b.num_refused += 1
            raise APIError(429, f"the server holds {b.held} bytes of images being prepared; "
                                f"the limit is {b.total} (media.max_inflight_image_mb): retry "
                                f"later", type="rate_limit_error", code="rate_limit_exceeded")
        self.bytes += num_bytes
        b.held += num_bytes

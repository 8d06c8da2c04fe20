"""A synthetic image+text request set: random images of given sizes, random text ids, the
image placeholders expanded as the model's processor would."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SyntheticRequest:
    request_id: str
    images: list = field(default_factory=list)           # PIL images
    text_ids: list[int] = field(default_factory=list)    # text tokens (placed after the images)
    output_len: int = 16


def parse_size(text: str) -> tuple[int, int]:
    """'336' → (336, 336); '1920x1080' → (1920, 1080)."""
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def make_requests(num_requests: int, image_sizes: list[tuple[int, int]], images_per_request: int,
                  prompt_len: int, output_len: int, vocab: tuple[int, int], seed: int = 0,
                  exclude_ids: tuple[int, ...] = ()) -> list[SyntheticRequest]:
    """Images cycle through `image_sizes`; each request gets fresh random pixels (no cache
    hits) and `prompt_len` random text ids drawn from [vocab[0], vocab[1])."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    out, k = [], 0
    for i in range(num_requests):
        images = []
        for _ in range(images_per_request):
            w, h = image_sizes[k % len(image_sizes)]
            k += 1
            images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB"))
        ids = rng.integers(vocab[0], vocab[1], prompt_len).tolist()
        ids = [t if t not in exclude_ids else vocab[0] for t in ids]
        out.append(SyntheticRequest(f"bench-{i}", images, ids, output_len))
    return out



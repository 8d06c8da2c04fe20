"""Shared fixtures: tiny checkpoints built offline (cached under .cache/tiny) and random images."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)


class CodeRunningPickle:
    """Pickles to `touch <marker>` on load: a .pt that must be refused (4xx), never unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_image(seed: int, w: int, h: int) -> Image.Image:
    """A random RGB image: same (seed, w, h), same pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="session")
def rng_image():
    """`rng_image(seed, w, h) -> PIL.Image` (random RGB)."""
    return make_image


@pytest.fixture(scope="session")
def tiny_llava():
    from mmhpc.tools.tiny import tiny_checkpoint
    return tiny_checkpoint("llava")


@pytest.fixture(scope="session")
def tiny_qwen2_vl():
    from mmhpc.tools.tiny import tiny_checkpoint
    return tiny_checkpoint("qwen2_vl")

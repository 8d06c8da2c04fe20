"""`PreprocessFeed` (mmhpc.multimodal.pipeline): results in input order, an error raised once
in the caller after the results before it, the inputs after it still delivered; and
`cat_to_device` on this machine."""
from __future__ import annotations

import time

import pytest
import torch

from mmhpc.engine.sequence import MMItem
from mmhpc.models.layers import cat_to_device
from mmhpc.multimodal.pipeline import PreprocessFeed


def _drain(feed) -> list:
    out = []
    while feed:
        out += feed.take(block=True)
    return out


def test_feed_order_and_tensors():
    scale = torch.arange(6.0)

    def prep(i):
        time.sleep(0.02 * ((7 - i) % 3))        # finish out of order
        return MMItem(f"h{i}", i, 3, None, scale * i)
    with PreprocessFeed(prep, range(8), num_workers=3) as f:
        got = _drain(f)
    assert [it.content_hash for it in got] == [f"h{i}" for i in range(8)]
    for i, it in enumerate(got):
        assert torch.equal(it.pixel_values, torch.arange(6.0) * i)


def test_feed_reraises():
    def prep(i):
        if i == 2:
            raise ValueError("bad image 2")
        return i
    got = []
    with PreprocessFeed(prep, range(4), num_workers=2) as f:
        with pytest.raises(ValueError, match="bad image 2"):
            while f:
                got += f.take(block=True)
        assert got == [0, 1]
        assert _drain(f) == [3]                 # the error is raised once; the rest go on


def test_cat_to_device_cpu():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(1, 3, 4, 4)
    out = cat_to_device([a, b], torch.device("cpu"), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.cat([a, b]).to(torch.bfloat16))

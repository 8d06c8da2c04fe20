"""`fast_pixel_values` (mmhpc.multimodal.processor): for an image already the processor's output
size, the same pixel values as Hugging Face's CLIP image processor, bit for bit (or None, where
no known way of this transformers version matches); None where it does not apply (other
sizes, other processors)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmhpc.multimodal.processor import InputProcessor, fast_pixel_values, pixel_formula
from mmhpc.tools.tiny import tiny_checkpoint


def _images(side: int, n: int = 4):
    rng = np.random.default_rng(side)
    ims = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
           for _ in range(n)]
    ramp = np.linspace(0, 255, side * side * 3).reshape(side, side, 3).astype(np.uint8)
    ims += [Image.fromarray(ramp), Image.fromarray(ramp[:, :, 0]).convert("L")]
    return ims


def _processors():
    from transformers import AutoImageProcessor
    from mmhpc.models.arch import arch_dir
    yield AutoImageProcessor.from_pretrained(str(arch_dir("arch:llava-1.5-7b")))
    yield InputProcessor(tiny_checkpoint("llava")).image_processor


@pytest.mark.parametrize("which", [0, 1])
def test_equal_to_hf_bit_for_bit(which):
    import transformers
    proc = list(_processors())[which]
    side = proc.crop_size["height"] if isinstance(proc.crop_size, dict) else proc.crop_size.height
    for im in _images(side):
        fast = fast_pixel_values(proc, im)
        formula = pixel_formula(proc)
        print(f"transformers {transformers.__version__} {type(proc).__name__}: "
              f"{formula.__name__ if formula else None}")
        if formula is None:             # no known way matches this version: never used
            assert fast is None
            continue
        ref = proc(images=[im], return_tensors="pt")["pixel_values"]
        assert fast.dtype == ref.dtype and fast.shape == ref.shape
        assert torch.equal(fast, ref)
    # other sizes: the processor's own resize and crop, not this
    assert fast_pixel_values(proc, Image.new("RGB", (side + 1, side))) is None
    assert fast_pixel_values(proc, Image.new("RGB", (2 * side, 2 * side))) is None


def test_known_formula_here():
    """The transformers versions this project runs with (5.24 here, 5.17 on the GPU machine)
    match one of the known ways: the fast path is in use."""
    from transformers import AutoImageProcessor
    from mmhpc.models.arch import arch_dir
    proc = AutoImageProcessor.from_pretrained(str(arch_dir("arch:llava-1.5-7b")))
    assert fast_pixel_values(proc, Image.new("RGB", (336, 336))) is not None


def test_not_for_other_processors():
    from transformers import AutoImageProcessor
    from mmhpc.models.arch import arch_dir
    proc = AutoImageProcessor.from_pretrained(str(arch_dir("arch:qwen2-vl-7b")))
    assert fast_pixel_values(proc, Image.new("RGB", (336, 336))) is None


def test_first_use_from_many_threads():
    """The server preprocesses in worker threads: while one thread's first call on a fresh
    processor checks the formula, requests arriving then get the processor's values (CI once
    saw one read the formula before its table was set: AttributeError, HTTP 500; before the
    fix this loop failed in ~1 of 4 rounds)."""
    import sys
    import threading
    import time
    proc = InputProcessor(tiny_checkpoint("llava")).image_processor
    side = proc.crop_size["height"] if isinstance(proc.crop_size, dict) else proc.crop_size.height
    im = _images(side, n=1)[0]
    ref = proc(images=[im], return_tensors="pt")["pixel_values"]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)             # switch threads often: the window is microseconds
    try:
        for _ in range(200):
            fresh = copy_processor(proc)
            got, errors = [], []

            def late():                     # arrives as soon as the first call is under way
                stop = time.monotonic() + 30
                while pixel_formula(fresh) is _UNSET_SEEN and time.monotonic() < stop:
                    pass
                try:
                    got.append(fast_pixel_values(fresh, im))
                except Exception as e:  # noqa: BLE001 - collected, asserted below
                    errors.append(e)

            threads = [threading.Thread(target=late) for _ in range(2)]
            for t in threads:
                t.start()
            got.append(fast_pixel_values(fresh, im))
            for t in threads:
                t.join()
            assert not errors, errors
            assert len(got) == 3
            for fast in got:
                assert fast is None if pixel_formula(fresh) is None else torch.equal(fast, ref)
    finally:
        sys.setswitchinterval(old)


_UNSET_SEEN = pixel_formula(object())       # what pixel_formula says before the first use


def copy_processor(proc):
    import copy
    fresh = copy.deepcopy(proc)
    for name in [n for n in vars(fresh) if n.startswith("_mmhpc_")]:
        delattr(fresh, name)
    return fresh

"""The fused ViT forward (`gpu_forward.prepare_vision`) of Qwen2.5-VL's windowed blocks (and
Qwen2-VL's, through the same attention helper; LLaVA-NeXT's CLIP tiles) equals HF's vision
tower: float32 on CPU (plain torch fallbacks: per-window SDPA, reference RMSNorm / SiLU-mul /
rotary), bf16 on CUDA (Triton kernels, FlashAttention varlen windows), for two images of
different sizes in one call (windows full and partial, and of unequal images in the
full-attention blocks; different tile grids)."""
from __future__ import annotations

import pytest
import torch

from mmhpc.engine.sequence import MMItem

# (family, device): Qwen2-VL's and CLIP's fused blocks need the Triton LayerNorm / quick-GELU.
# One parametrize of plain values: bench/run_gpu_tests.py runs this file on the GPU machine.
CASES = ["qwen2_5_vl/cpu"] + ([f"{f}/cuda" for f in ("qwen2_5_vl", "qwen2_vl", "llava_next")]
                             if torch.cuda.is_available() else [])


@pytest.mark.parametrize("case", CASES)
def test_fast_vit_matches_hf(case):
    import numpy as np
    from PIL import Image

    from mmhpc.engine.gpu_forward import prepare_vision
    from mmhpc.models import load_model
    from mmhpc.multimodal.processor import InputProcessor
    from mmhpc.tools.tiny import tiny_checkpoint
    family, device = case.split("/")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    path = tiny_checkpoint(family, **({} if family == "llava_next" else {"image_size": 224}))
    rng = np.random.default_rng(0)
    proc = InputProcessor(path)
    items = [proc.image_item(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
             for w, h in ((224, 168), (84, 140))]
    model = load_model(path, dtype=dtype, device=device)
    with torch.no_grad():
        want = torch.cat(model.encode(items)).float()               # HF's blocks
        prepare_vision(model)
        tower = getattr(model, "vision_tower", None)
        blocks = model.visual.blocks if tower is None else \
            getattr(tower, "vision_model", tower).encoder.layers
        assert all("forward" in vars(b) for b in blocks)                   # the fused blocks
        got = torch.cat(model.encode(items)).float()
    assert got.shape == want.shape and len({it.num_tokens for it in items}) == 2
    err = float((got - want).norm() / want.norm())
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err

"""Qwen2.5-VL: its ViT (HF module: windowed attention with a few full-attention layers, RMSNorm
and SwiGLU blocks) + the Qwen2 decoder with M-RoPE, as Qwen2-VL. An image's positions do not
depend on time (t = 1), so Qwen2-VL's `mrope_positions` holds for images."""
from __future__ import annotations

from mmhpc.models.qwen2_vl import WEIGHT_RULES, Qwen2VLForCausalLM

__all__ = ["WEIGHT_RULES", "Qwen2_5_VLForCausalLM"]


def _vision_cls():
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m
    for name in ("Qwen2_5_VisionTransformerPretrainedModel", "Qwen2_5_VLVisionModel"):
        if hasattr(m, name):
            return getattr(m, name)
    raise ImportError("no Qwen2.5-VL vision transformer in this transformers version")


class Qwen2_5_VLForCausalLM(Qwen2VLForCausalLM):
    vision_cls = staticmethod(_vision_cls)

"""Qwen3-VL: its ViT with DeepStack (HF module) + our Qwen3 decoder (QK-norm, interleaved
M-RoPE); Qwen3-VL-MoE: the same with `models.moe` MoE layers.

DeepStack: the ViT also merges the hidden states of a few of its layers
(`deepstack_visual_indexes`, L of them) into hidden-wide features, added to the image rows
after decoder layers 0..L-1. `encode` returns one bundle per image, `[n, (1 + L) * hidden]`:
the embeddings, then the L DeepStack blocks (vLLM's `image_embeds` layout). The bundle is what
the encode cache keeps, what one NIXL READ moves to prefill, and what an embeddings file holds.
"""
from __future__ import annotations

import torch

from mmhpc.distributed.parallel import ParallelLMHead
from mmhpc.models.layers import Decoder
from mmhpc.models.qwen2_vl import WEIGHT_RULES, Qwen2VLForCausalLM  # noqa: F401


def deepstack_levels(config) -> int:
    """L: the DeepStack blocks of an image bundle (0: none)."""
    return len(getattr(config.vision_config, "deepstack_visual_indexes", None) or ())


class Qwen3VLForCausalLM(Qwen2VLForCausalLM):
    """Qwen2-VL's M-RoPE positions, encode (bundles), warm-up images and forward; its own
    ViT and decoder."""

    def __init__(self, config, make_mlp=None):
        torch.nn.Module.__init__(self)
        from transformers import AutoModel
        self.config = config
        self.text_config = config.text_config
        self.deepstack_levels = deepstack_levels(config)
        self.visual = AutoModel.from_config(config.vision_config)   # Qwen3-VL(-MoE) ViT
        self.language_model = Decoder(config.text_config,
                                      qkv_bias=getattr(config.text_config, "attention_bias", False),
                                      o_bias=getattr(config.text_config, "attention_bias", False),
                                      qk_norm=True, make_mlp=make_mlp)
        self.lm_head = ParallelLMHead(config.text_config.hidden_size, config.text_config.vocab_size)


class Qwen3VLMoeForCausalLM(Qwen3VLForCausalLM):
    """Qwen3-VL-MoE: the MoE layer (`models.moe`: softmax top-k, renormalised; its expert
    parallelism) on the layers HF makes sparse (`mlp_only_layers`, `decoder_sparse_step`),
    the dense MLP elsewhere."""

    def __init__(self, config):
        from mmhpc.models.moe import MoE, MoESpec
        tc = config.text_config
        dense = set(getattr(tc, "mlp_only_layers", None) or ())
        step = getattr(tc, "decoder_sparse_step", 1) or 1
        spec = MoESpec(tc.hidden_size, tc.moe_intermediate_size, tc.num_experts,
                       tc.num_experts_per_tok, scoring="softmax",
                       renormalize=True,             # HF's Qwen3-VL-MoE router always does
                       hidden_act=tc.hidden_act, layout="auto")

        def make_mlp(i: int):
            sparse = i not in dense and tc.num_experts > 0 and (i + 1) % step == 0
            return MoE(spec, router_name="gate") if sparse else None
        super().__init__(config, make_mlp)

"""LLaVA-1.5: CLIP vision tower (HF module) + linear-gelu-linear projector + our Llama decoder."""
from __future__ import annotations

import torch
from torch import nn

from mmhpc.distributed.parallel import ParallelLMHead
from mmhpc.models.layers import AttentionMetadata, Decoder, cat_to_device

# checkpoint prefix → our parameter prefix (HF 5.x names first, then legacy ones)
WEIGHT_RULES = [
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


class Projector(nn.Module):
    def __init__(self, config):
        super().__init__()
        layers = config.vision_feature_layer
        num = 1 if isinstance(layers, int) else len(layers)
        bias = getattr(config, "multimodal_projector_bias", True)
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size * num, hidden, bias=bias)
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)
        from transformers.activations import ACT2FN
        self.act = ACT2FN[config.projector_hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def image_tokens(config, height: int, width: int) -> int:
    """Placeholder tokens of one image of pixel size height x width (the processor's output)."""
    vc = config.vision_config
    n = (height // vc.patch_size) * (width // vc.patch_size)
    return n + (config.vision_feature_select_strategy != "default")     # CLS kept


class LlavaForCausalLM(nn.Module):
    uses_mrope = False

    def __init__(self, config):
        super().__init__()
        from transformers import AutoModel
        self.config = config
        self.text_config = config.text_config
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = Projector(config)
        self.language_model = Decoder(config.text_config,
                                      qkv_bias=getattr(config.text_config, "attention_bias", False),
                                      o_bias=getattr(config.text_config, "attention_bias", False),
                                      mlp_bias=getattr(config.text_config, "mlp_bias", False))
        self.lm_head = ParallelLMHead(config.text_config.hidden_size, config.text_config.vocab_size)

    @torch.inference_mode()
    def encode(self, mm_items) -> list[torch.Tensor]:
        """Pixel values of all items in one batch → [num_tokens, hidden] per item."""
        return list(self.tile_features(mm_items).unbind(0))

    def tile_features(self, mm_items) -> torch.Tensor:
        """Every item's pixel values ([3, S, S] or [n, 3, S, S]) through the tower and the
        projector in one batch → [num_tiles, tokens, hidden], in item order."""
        dtype = next(self.vision_tower.parameters()).dtype
        pixels = [it.pixel_values if it.pixel_values.dim() == 4 else it.pixel_values[None]
                  for it in mm_items]
        pixels = cat_to_device(pixels, self.lm_head.weight.device, dtype)
        out = self.vision_tower(pixels, output_hidden_states=True)
        layers, strategy = self.config.vision_feature_layer, self.config.vision_feature_select_strategy
        layers = [layers] if isinstance(layers, int) else list(layers)
        total = self.config.vision_config.num_hidden_layers + 1   # absolute: the GPU path
        feats = [out.hidden_states[i % total] for i in layers]     # drops unread deep layers
        if strategy == "default":                                   # drop CLS
            feats = [f[:, 1:] for f in feats]
        return self.multi_modal_projector(torch.cat(feats, dim=-1))     # [N, tokens, hidden]

    def warm_up_items(self, max_tokens: int, max_items: int = 64) -> list:
        """Blank images (the tower's input size) filling `max_tokens` placeholder tokens: the
        engine encodes them once at start-up (a step's largest vision batch)."""
        from mmhpc.engine.sequence import MMItem
        side = self.config.vision_config.image_size
        tokens = image_tokens(self.config, side, side)
        n = max(1, min(max_items, max_tokens // tokens))
        return [MMItem("warm-up", 0, tokens, None, torch.zeros(3, side, side)) for _ in range(n)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor, mm_embeds=None) -> torch.Tensor:
        return self.language_model(input_ids, positions, meta, kv_cache, mm_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

"""Qwen2-VL: its ViT (HF module) + our Qwen2 decoder (q/k/v bias) with M-RoPE."""
from __future__ import annotations

import torch
from torch import nn

from mmhpc.distributed.parallel import ParallelLMHead
from mmhpc.models.layers import AttentionMetadata, Decoder, cat_to_device

WEIGHT_RULES = [
    ("model.language_model.", "language_model."),
    ("model.visual.", "visual."),
    ("visual.", "visual."),
    ("lm_head.", "lm_head."),
    ("model.", "language_model."),                 # legacy: model.layers.N…
]


def _vision_cls():
    from transformers.models.qwen2_vl import modeling_qwen2_vl as m
    for name in ("Qwen2VisionTransformerPretrainedModel", "Qwen2VLVisionModel"):
        if hasattr(m, name):
            return getattr(m, name)
    raise ImportError("no Qwen2-VL vision transformer in this transformers version")


def mrope_positions(token_ids, grid_thws, config) -> tuple[torch.Tensor, int]:
    """M-RoPE positions [3, T] and the delta of generated positions (HF's get_rope_index).
    Text runs count up on all three axes; an image's tokens take (t, h, w) grid positions
    offset by the text before it; the text after resumes at max + 1."""
    image_token_id = config.image_token_id
    merge = config.vision_config.spatial_merge_size
    ids = list(token_ids)
    grids = iter(grid_thws)
    rows: list[torch.Tensor] = []
    pos, i, text_start = 0, 0, 0

    def flush_text(end: int) -> None:
        nonlocal pos
        if end > text_start:
            rows.append(torch.arange(pos, pos + end - text_start).expand(3, -1))
            pos += end - text_start

    while i < len(ids):
        if ids[i] != image_token_id:
            i += 1
            continue
        flush_text(i)
        t, h, w = (int(x) for x in next(grids))
        gh, gw = h // merge, w // merge
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        rows.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
        pos += max(gh, gw)
        i += t * gh * gw
        text_start = i
    flush_text(len(ids))
    positions = torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions.long(), delta


def image_tokens(config, grid_thw) -> int:
    """Placeholder tokens of one image of `grid_thw` patches (after the spatial merge)."""
    t, h, w = grid_thw
    return t * h * w // config.vision_config.spatial_merge_size ** 2


class Qwen2VLForCausalLM(nn.Module):
    uses_mrope = True
    vision_cls = staticmethod(_vision_cls)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.text_config = config.text_config
        self.visual = self.vision_cls()._from_config(config.vision_config)
        self.language_model = Decoder(config.text_config, qkv_bias=True)
        self.lm_head = ParallelLMHead(config.text_config.hidden_size, config.text_config.vocab_size)

    def mrope_positions(self, token_ids, grid_thws) -> tuple[torch.Tensor, int]:
        return mrope_positions(token_ids, grid_thws, self.config)

    @torch.inference_mode()
    def encode(self, mm_items) -> list[torch.Tensor]:
        """All items' patches in one ViT call (cu_seqlens keeps images apart). A ViT with
        DeepStack features (Qwen3-VL) gives `[n, (1 + L) * hidden]` bundles."""
        dtype = next(self.visual.parameters()).dtype
        device = self.lm_head.weight.device
        pixels = cat_to_device([it.pixel_values for it in mm_items], device, dtype)
        grid = torch.tensor([list(it.grid_thw) for it in mm_items], dtype=torch.long, device=device)
        out = self.visual(pixels, grid_thw=grid)
        embeds = getattr(out, "pooler_output", out)                 # 5.x output vs bare tensor
        deep = getattr(out, "deepstack_features", None)
        if deep:
            embeds = torch.cat([embeds, *deep], dim=1)              # [N, (1 + L) * hidden]
        return list(embeds.split([image_tokens(self.config, it.grid_thw) for it in mm_items]))

    def warm_up_items(self, max_tokens: int, max_items: int = 64) -> list:
        """Blank 336 x 336 px images (24 x 24 patches) filling `max_tokens` placeholder tokens:
        the engine encodes them once at start-up."""
        from mmhpc.engine.sequence import MMItem
        vc = self.config.vision_config
        side = 24
        tokens = image_tokens(self.config, (1, side, side))
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        n = max(1, min(max_items, max_tokens // tokens))
        return [MMItem("warm-up", 0, tokens, (1, side, side), torch.zeros(side * side, width))
                for _ in range(n)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor, mm_embeds=None) -> torch.Tensor:
        return self.language_model(input_ids, positions, meta, kv_cache, mm_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

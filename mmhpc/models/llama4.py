"""Llama-4 (Scout, Maverick): HF's vision tower (tiles + global view, its 2-D rotary, pixel
shuffle and adapter MLP) + the projector + our text decoder over the paged cache.

Text decoder, as HF's `Llama4TextModel`:
- feed-forward: `MoE` (mmhpc/models/moe.py; top-1 sigmoid on the router logits scaling the
  expert's input, plus a shared expert) on `text_config.moe_layers` (from
  `interleave_moe_layer_step`: Scout every layer, Maverick every 2nd), a dense SwiGLU of
  `intermediate_size_mlp` elsewhere;
- attention: rotary on pairs of adjacent dims (complex form) except on NoPE layers
  (`no_rope_layers[i] == 0`); L2 norm of q and k after rotary (`use_qk_norm`, rotary layers);
  on NoPE layers q scaled by log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1
  (`attn_temperature_tuning`); rotary layers see only their own chunk of
  `attention_chunk_size` positions (`layer_types[i] == "chunked_attention"`), NoPE layers
  everything.

An image's placeholder (`MMItem`) is its whole span, <|image_start|> .. <|image_end|>, with
`grid_thw = (1, rows, cols)` its tile grid; `encode` returns [span, hidden] with the vision
features on the <|patch|> rows, and `forward` writes only those rows (the separators keep
their token embeddings).
"""
from __future__ import annotations

import torch
from torch import nn

from mmhpc.distributed.parallel import ParallelLMHead, VocabParallelEmbedding
from mmhpc.models.layers import (MLP, Attention, AttentionMetadata, RMSNorm, RotaryEmbedding,
                                 cat_to_device, paged_attention, write_kv)
from mmhpc.models.moe import MoE, MoESpec
from mmhpc.multimodal import tiles

WEIGHT_RULES = [
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "language_model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("vision_model.", "vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "lm_head."),
]

# routing fields of other MoE families: a Llama-4 config that sets one asks for a variant
# this module does not implement (top-1 sigmoid routing scaling the input + a shared expert)
_OTHER_ROUTING = ("scoring_func", "topk_method", "n_group", "topk_group", "routed_scaling_factor",
                  "norm_topk_prob", "n_shared_experts", "first_k_dense_replace", "router_type")


def moe_spec(cfg) -> MoESpec:
    """The MoE layers' spec from a Llama-4 text config; an unimplemented variant: ValueError
    naming the config field."""
    for name in _OTHER_ROUTING:
        value = getattr(cfg, name, None)
        if value not in (None, False, 0):
            raise ValueError(f"text_config.{name}={value!r}: this MoE variant is not implemented "
                             "for Llama-4 (top-1 sigmoid routing scaling the input, one shared expert)")
    if cfg.num_experts_per_tok != 1:
        raise ValueError(f"text_config.num_experts_per_tok={cfg.num_experts_per_tok}: Llama-4 "
                         "routing is implemented for top-1 only")
    return MoESpec(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, top_k=1,
                   scoring="sigmoid", weight_on_input=True,
                   shared_intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
                   layout="in_out")


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on adjacent pairs (HF's complex form), in float32. x [T, h, D]; cos/sin [T, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))                           # [T, h, D/2, 2]
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, None].float(), sin[:, None].float()
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).type_as(x)


def _l2norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class Llama4Attention(Attention):
    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias)
        self.use_rope = bool(cfg.no_rope_layers[layer_idx])
        self.qk_norm = bool(cfg.use_qk_norm and self.use_rope)
        self.eps = cfg.rms_norm_eps
        self.temperature = (cfg.floor_scale, cfg.attn_scale) \
            if cfg.attn_temperature_tuning and not self.use_rope else None
        chunked = cfg.layer_types[layer_idx] == "chunked_attention"
        self.chunk = cfg.attention_chunk_size if chunked else None

    def qkv(self, x, cos, sin, positions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H, D], k, v [T, KVH, D]: rotary, QK norm and temperature applied."""
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = _rotate_pairs(q, cos, sin), _rotate_pairs(k, cos, sin)
        if self.qk_norm:
            q, k = _l2norm(q, self.eps), _l2norm(k, self.eps)
        if self.temperature is not None:
            floor_scale, attn_scale = self.temperature
            scales = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0
            q = (q * scales[:, None, None]).to(q.dtype)                 # [T, H, D]
        return q, k, v

    def forward(self, x, cos, sin, positions, meta: AttentionMetadata, layer_cache) -> torch.Tensor:
        q, k, v = self.qkv(x, cos, sin, positions)
        write_kv(layer_cache, k, v, meta)
        o = paged_attention(q, layer_cache, meta, self.scale, chunk=self.chunk)
        return self.o_proj(o.reshape(x.shape[0], -1))


class Llama4DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.self_attn = Llama4Attention(cfg, layer_idx)
        if layer_idx in cfg.moe_layers:
            self.feed_forward = MoE(moe_spec(cfg), router_name="router")
        else:
            from types import SimpleNamespace
            self.feed_forward = MLP(SimpleNamespace(hidden_size=cfg.hidden_size, hidden_act=cfg.hidden_act,
                                                    intermediate_size=cfg.intermediate_size_mlp))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, positions, meta, layer_cache):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, positions, meta, layer_cache)
        return h + self.feed_forward(self.post_attention_layernorm(h))


class Llama4Decoder(nn.Module):
    def __init__(self, cfg, image_token_id: int = -1):
        super().__init__()
        self.config, self.image_token_id = cfg, image_token_id
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Llama4DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg, cfg.head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor, mm_embeds=None) -> torch.Tensor:
        h = self.embed_tokens(input_ids)                            # [T, hidden]
        if mm_embeds is not None:
            rows, values = mm_embeds                                # [R], [R, hidden]
            keep = input_ids.index_select(0, rows) == self.image_token_id
            h[rows[keep]] = values[keep].to(h.dtype)
        cos, sin = self.rotary(positions, h.dtype)                  # [T, D]
        half = cos.shape[-1] // 2
        cos, sin = cos[:, :half], sin[:, :half]
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, positions, meta, kv_cache[i])
        return self.norm(h)


class Llama4ForCausalLM(nn.Module):
    uses_mrope = False
    fast_path = False       # the engine's CUDA fast path (FastDecoder) is Llama/Qwen2-only:
                            # plain torch on CUDA; bench/llama4_gpu.py times the graphed decode

    def __init__(self, config):
        super().__init__()
        from transformers.models.llama4.modeling_llama4 import Llama4VisionModel
        self.config = config
        self.text_config = config.text_config
        self.vision_model = Llama4VisionModel(config.vision_config)
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear_1 = nn.Linear(
            config.vision_config.vision_output_dim, config.text_config.hidden_size, bias=False)
        self.language_model = Llama4Decoder(config.text_config, config.image_token_index)
        self.lm_head = ParallelLMHead(config.text_config.hidden_size, config.text_config.vocab_size)
        vc = config.vision_config
        self.tokens_per_tile = int((vc.image_size // vc.patch_size) ** 2 * vc.pixel_shuffle_ratio ** 2)

    def _apply(self, fn, recurse=True):
        """Keep the vision rotary's complex table complex (a dtype cast would drop its
        imaginary part); it follows the model's device."""
        rot = self.vision_model.rotary_embedding
        freqs = rot.freqs_ci
        out = super()._apply(fn, recurse)
        rot.freqs_ci = freqs.to(self.lm_head.weight.device)
        return out

    def _span_ids(self, rows: int, cols: int) -> list[int]:
        c = self.config
        patch = c.image_token_index
        ids = dict(zip(tiles.SPECIAL, (c.boi_token_index, c.eoi_token_index, -2, patch, -3, -4)))
        return tiles.span_ids(rows, cols, self.tokens_per_tile, ids)

    @torch.inference_mode()
    def encode(self, mm_items) -> list[torch.Tensor]:
        """All items' tiles in one vision call -> [span, hidden] per item (features on the
        <|patch|> rows, zeros elsewhere)."""
        dtype = next(self.vision_model.parameters()).dtype
        device = self.lm_head.weight.device
        pixels = cat_to_device([it.pixel_values for it in mm_items], device, dtype)
        feats = self.vision_model(pixels).last_hidden_state            # [N, tokens, Dv]
        feats = self.multi_modal_projector.linear_1(feats.flatten(0, 1))   # [N * tokens, hidden]
        out, start = [], 0
        for it in mm_items:
            n = it.pixel_values.shape[0] * self.tokens_per_tile
            _, rows, cols = it.grid_thw
            patch = torch.tensor(self._span_ids(rows, cols), device=device) == self.config.image_token_index
            span = feats.new_zeros(len(patch), feats.shape[-1])
            span[patch] = feats[start:start + n]
            out.append(span)
            start += n
        return out

    def warm_up_items(self, max_tokens: int, max_items: int = 64) -> list:
        """Blank one-tile images filling `max_tokens` placeholder tokens (start-up encode)."""
        from mmhpc.engine.sequence import MMItem
        side = self.config.vision_config.image_size
        span = tiles.span_length(1, 1, self.tokens_per_tile)
        n = max(1, min(max_items, max_tokens // span))
        return [MMItem("warm-up", 0, span, (1, 1, 1), torch.zeros(1, 3, side, side)) for _ in range(n)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor, mm_embeds=None) -> torch.Tensor:
        return self.language_model(input_ids, positions, meta, kv_cache, mm_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

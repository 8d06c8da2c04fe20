"""Tiny LLaVA-NeXT and Qwen2.5-VL checkpoints (`mmhpc.tools.tiny` builds them; registered in
mmhpc/models/registry.py). LLaVA-NeXT: LLaVA's tokenizer and chat template, a CLIP tower of
`image_size` px tiles, llava-v1.6's grid pinpoints in tiles, a Llama language model (or, with
mistral=1, Mistral without a sliding window, as llava-v1.6-mistral). Qwen2.5-VL: Qwen2-VL's
tokenizer and template, a ViT with RMSNorm + SwiGLU blocks, windows of `window` px and full
attention in every second block (as 7, 15, 23, 31 of Qwen2.5-VL-7B's 32)."""
from __future__ import annotations

from typing import Any

from mmhpc.tools import tiny as t

LLAVA_NEXT_TILES = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]    # llava-v1.6's, in tiles


def _pinpoints(s: dict[str, int]) -> list[list[int]]:
    return [[h * s["image_size"], w * s["image_size"]] for h, w in LLAVA_NEXT_TILES]


def _llava_next(s: dict[str, int], vocab_size: int):
    import torch
    from transformers import (LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              MistralConfig)

    kw = t._llama_kw(s, vocab_size)
    text = MistralConfig(sliding_window=None, rope_theta=1e6, **kw) if s["mistral"] \
        else LlamaConfig(**kw)
    config = LlavaNextConfig(
        vision_config=t._clip_vision(s), text_config=text, image_token_index=3,
        image_grid_pinpoints=_pinpoints(s), projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        tie_word_embeddings=False)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():         # as large as a token embedding: the row ends must matter
        gen = torch.Generator().manual_seed(s["seed"] + 1)
        model.model.image_newline.copy_(torch.randn(s["hidden"], generator=gen))
    return model


def _qwen2_5_vl(s: dict[str, int], vocab_size: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(
        depth=s["vision_layers"], hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"], num_heads=s["vision_hidden"] // 16,
        out_hidden_size=s["hidden"], patch_size=s["patch_size"], spatial_merge_size=2,
        temporal_patch_size=2, in_channels=3, window_size=s["window"], hidden_act="silu",
        fullatt_block_indexes=list(range(1, s["vision_layers"], 2)))
    config = Qwen2_5_VLConfig(text_config=t._qwen_text(s, vocab_size, "qwen2_5_vl_text"),
                              vision_config=vision, **t.QWEN_TOKENS)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    return Qwen2_5_VLForConditionalGeneration(config)


def _llava_next_files(s: dict[str, int]) -> dict[str, dict]:
    files = t._llava_files(s)
    files["preprocessor_config.json"].update(
        image_processor_type="LlavaNextImageProcessor", processor_class="LlavaNextProcessor",
        do_pad=True, image_grid_pinpoints=_pinpoints(s))
    files["processor_config.json"]["processor_class"] = "LlavaNextProcessor"
    return files


def _sizes(**extra: Any) -> dict[str, int]:
    return {**dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vision_layers=2,
                   vision_hidden=32, vocab=640, seed=0), **extra}


LLAVA_NEXT = t.TinyFamily(
    # image_size: the tower's (a tile's) side
    sizes=_sizes(image_size=32, patch_size=8, mistral=0),
    specials=t.LLAVA_SPECIALS, chat_template=t.LLAVA_CHAT_TEMPLATE, tokenizer=t._llama_tokenizer,
    model=_llava_next, processor_files=_llava_next_files, eos_token_id=2, check=t._llava_check)

QWEN2_5_VL = t.TinyFamily(
    # image_size: the longest side budget (max_pixels = image_size**2); window: 56 px = 2 x 2
    # merged tokens, so a 112 px image has 4 windows and other sizes partial ones
    sizes=_sizes(vision_layers=4, image_size=112, patch_size=14, window=56),
    specials=t.QWEN2_VL_SPECIALS, chat_template=t.QWEN2_VL_CHAT_TEMPLATE,
    tokenizer=t._qwen_tokenizer, model=_qwen2_5_vl,
    processor_files=lambda s: t._qwen2_vl_files(s, "Qwen2_5_VLProcessor"),
    eos_token_id=[2, 0], check=t._qwen2_vl_check)

"""Tiny random-weight multimodal checkpoints, built offline (no model hub).

`python -m mmhpc.tools.tiny --family llava|qwen2_vl|qwen3_vl|... --out DIR [--layers N ...]` writes a
complete Hugging Face checkpoint directory: config.json, model.safetensors,
generation_config.json, a byte-level BPE tokenizer trained here on `corpus.py`, a chat
template, and the image/processor configs, so that `AutoModelForImageTextToText` and
`AutoProcessor` load it.

Token ids (every family): 0 = pad, 1 = bos, 2 = eos; the family's image tokens follow
(llava: 3 = `<image>`; qwen2_vl: see QWEN2_VL_SPECIALS, `<|image_pad|>` = 6; llama4: see
LLAMA4_SPECIALS, `<|patch|>` = 8).

llama4 is Maverick-like (MoE every `moe_step`=2 layers, dense between; `--moe-step 1`: Scout-
like, every layer MoE), with 4 experts, a NoPE layer every 4th, attention chunks of 16
tokens and temperature tuning from position 8 on, so that short tests cross all of them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmhpc.multimodal.processor import hf_processor  # noqa: F401  (the oracle's input side)

BUILD_VERSION = 2   # bump when the builder's output changes: cached builds are keyed on it


@dataclass(frozen=True)
class TinyFamily:
    """How to build one family's tiny checkpoint; registered as `Family.tiny`
    (mmhpc/models/registry.py). The size keys are the CLI's flags."""

    sizes: dict[str, int]               # defaults; every key may be overridden
    specials: list[str]                 # the tokenizer's special tokens, ids 0, 1, ...
    chat_template: str
    tokenizer: Callable[[Any], dict]    # (tokenizers.Tokenizer) -> PreTrainedTokenizerFast kwargs
    model: Callable[[dict, int], Any]   # (sizes, vocab_size) -> an HF model, random init
    processor_files: Callable[[dict], dict[str, dict]]   # sizes -> {file name: json}
    eos_token_id: int | list[int]       # generation_config.json's
    check: Callable[[dict], None] = lambda s: None      # family-specific size rules
    embed_scale: float = 1.0            # std of embed_tokens x sqrt(hidden) (Gemma scales them)


def family_builder(family: str) -> TinyFamily:
    from mmhpc.models.registry import get_family, tiny_families
    if family not in tiny_families():
        raise ValueError(f"unknown family {family!r}; expected one of {tiny_families()}")
    return get_family(family).tiny_builder()


def default_sizes(family: str) -> dict[str, int]:
    return dict(family_builder(family).sizes)


LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<image>"]
QWEN2_VL_SPECIALS = ["<|endoftext|>", "<|bos|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>",
                     "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _content_template(image: str) -> str:
    """Jinja: a message's content, a string or text and image parts, each image as `image`."""
    return ("{%- if message['content'] is string -%}{{ message['content'] }}"
            "{%- else -%}{%- for part in message['content'] -%}"
            "{%- if part['type'] in ('image', 'image_url', 'input_image') -%}{{ '" + image + "' }}"
            "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
            "{%- endfor -%}{%- endif -%}")


# llava-1.5 style: "USER: <image>\nWhat is this? ASSISTANT:"; the tokenizer prepends <s>.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '' }}"
    "{%- else -%}{{ message['role'] | upper }}{{ ': ' }}{%- endif -%}"
    + _content_template("<image>\\n") +
    "{%- if message['role'] == 'assistant' -%}{{ '</s>' }}{%- endif -%}"
    "{{ ' ' if (not loop.last or add_generation_prompt) else '' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Qwen2-VL's own template (images and videos; default system prompt).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] in ('image', 'image_url', 'input_image') %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA4_SPECIALS = ["<|finetune_right_pad|>", "<|begin_of_text|>", "<|eot|>", "<|header_start|>",
                   "<|header_end|>", "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                   "<|tile_x_separator|>", "<|tile_y_separator|>"]

# Llama-4's own template, without tools: <|begin_of_text|> then one header + <|eot|> a message.
LLAMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|header_start|>{{ message['role'] }}<|header_end|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] in ('image', 'image_url', 'input_image') %}<|image|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)

GEMMA3_SPECIALS = ["<pad>", "<bos>", "<eos>", "<start_of_image>", "<end_of_image>",
                   "<image_soft_token>", "<start_of_turn>", "<end_of_turn>"]

# Gemma-3 style turns; an image part is <start_of_image>, which Gemma3Processor expands to
# "\n\n<start_of_image>" + <image_soft_token> x mm_tokens_per_image + "<end_of_image>\n\n".
GEMMA3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<start_of_turn>' }}{{ 'model' if message['role'] == 'assistant' else message['role'] }}"
    "{{ '\n' }}"
    + _content_template("<start_of_image>") +
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _sizes(family: str, sizes: dict[str, Any]) -> dict[str, int]:
    builder = family_builder(family)
    out = dict(builder.sizes)
    unknown = set(sizes) - set(out)
    if unknown:
        raise ValueError(f"unknown sizes {sorted(unknown)}; expected {sorted(out)}")
    out.update({k: int(v) for k, v in sizes.items() if v is not None})
    s = out
    if s["hidden"] % s["heads"] or s["heads"] % s["kv_heads"]:
        raise ValueError(f"hidden={s['hidden']} heads={s['heads']} kv_heads={s['kv_heads']}: "
                         "heads must divide hidden and kv_heads must divide heads")
    if s["vision_hidden"] % 16:
        raise ValueError("vision_hidden must be a multiple of 16 (vision heads of 16 dims)")
    builder.check(s)
    return out


# ---------------------------------------------------------------------------- tokenizer
def _train_tokenizer(builder: TinyFamily, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mmhpc.tools.corpus import corpus_lines

    specials = builder.specials
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(), trainer)
    kw = builder.tokenizer(tok)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **kw)
    for i, t in enumerate(specials):
        assert tokenizer.convert_tokens_to_ids(t) == i, (t, i)
    return tokenizer


def _llama_tokenizer(tok) -> dict:
    from tokenizers import processors
    # Llama-style: every encoded text starts with <s>
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                extra_special_tokens={"image_token": "<image>"})


def _gemma3_tokenizer(tok) -> dict:
    from tokenizers import processors
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)])
    return dict(pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                extra_special_tokens={"boi_token": "<start_of_image>",
                                      "eoi_token": "<end_of_image>",
                                      "image_token": "<image_soft_token>"})


def _llama4_tokenizer(tok) -> dict:
    from tokenizers import processors
    tok.post_processor = processors.ByteLevel(trim_offsets=False)   # the template adds bos
    return dict(pad_token="<|finetune_right_pad|>", bos_token="<|begin_of_text|>",
                eos_token="<|eot|>", extra_special_tokens={"image_token": "<|image|>"})


def _qwen_tokenizer(tok) -> dict:
    from tokenizers import processors
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return dict(pad_token="<|endoftext|>", bos_token="<|bos|>", eos_token="<|im_end|>",
                extra_special_tokens={"image_token": "<|image_pad|>",
                                      "video_token": "<|video_pad|>"})


# ------------------------------------------------------------------------------- models
def _clip_vision(s: dict[str, int]):
    """The LLaVA families' CLIP tower config."""
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(
        hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_hidden"] // 16,
        image_size=s["image_size"], patch_size=s["patch_size"], projection_dim=s["vision_hidden"])


def _llama_kw(s: dict[str, int], vocab_size: int) -> dict[str, Any]:
    """A Llama-style language model's config values (LlamaConfig, MistralConfig)."""
    return dict(
        vocab_size=vocab_size, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _llava(s: dict[str, int], vocab_size: int):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision, text = _clip_vision(s), LlamaConfig(**_llama_kw(s, vocab_size))
    num_tokens = (s["image_size"] // s["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=3, image_seq_length=num_tokens,
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-2, tie_word_embeddings=False)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    return LlavaForConditionalGeneration(config)


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2       # Qwen2-VL: [16, 24, 24] for head_dim 128
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qwen_text(s: dict[str, int], vocab_size: int, model_type: str) -> dict[str, Any]:
    """The Qwen-VL families' language model config (M-RoPE)."""
    head_dim = s["hidden"] // s["heads"]
    return dict(
        vocab_size=vocab_size, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": _mrope_section(head_dim)},
        bos_token_id=1, eos_token_id=2, pad_token_id=0, model_type=model_type)


QWEN_TOKENS = dict(image_token_id=6, video_token_id=7, vision_start_token_id=4,
                   vision_end_token_id=5, tie_word_embeddings=False)


def _qwen2_vl(s: dict[str, int], vocab_size: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = _qwen_text(s, vocab_size, "qwen2_vl_text")
    vision = dict(
        depth=s["vision_layers"], embed_dim=s["vision_hidden"], hidden_size=s["hidden"],
        num_heads=s["vision_hidden"] // 16, mlp_ratio=2, patch_size=s["patch_size"],
        spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **QWEN_TOKENS)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    return Qwen2VLForConditionalGeneration(config)


def _qwen3_vl(s: dict[str, int], vocab_size: int, moe: bool = False):
    """Qwen3-VL (QK-norm, interleaved M-RoPE, DeepStack from the first `vision_layers - 1` ViT
    layers); `moe`: every layer's MLP sparse (`experts`, `top_k`)."""
    import transformers as tf

    head_dim = s["hidden"] // s["heads"]
    text = dict(
        vocab_size=vocab_size, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], head_dim=head_dim,
        num_key_value_heads=s["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                         "mrope_section": _mrope_section(head_dim)},
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if moe:
        text.update(num_experts=s["experts"], num_experts_per_tok=s["top_k"],
                    moe_intermediate_size=s["intermediate"], decoder_sparse_step=1)
    vision = dict(
        depth=s["vision_layers"], hidden_size=s["vision_hidden"],
        intermediate_size=2 * s["vision_hidden"], num_heads=s["vision_hidden"] // 16,
        patch_size=s["patch_size"], spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
        out_hidden_size=s["hidden"], num_position_embeddings=64,
        deepstack_visual_indexes=list(range(s["vision_layers"] - 1)))
    name = "Qwen3VLMoe" if moe else "Qwen3VL"
    config = getattr(tf, name + "Config")(
        text_config=text, vision_config=vision, image_token_id=6, video_token_id=7,
        vision_start_token_id=4, vision_end_token_id=5, tie_word_embeddings=False)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    return getattr(tf, name + "ForConditionalGeneration")(config)


def _gemma3_image_tokens(s: dict[str, int]) -> int:
    side = s["image_size"] // s["patch_size"] // 2     # the projector pools 2 x 2 patches
    return side * side


def _gemma3(s: dict[str, int], vocab_size: int):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(
        vocab_size=vocab_size, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], head_dim=s["hidden"] // s["heads"],
        max_position_embeddings=4096, sliding_window=16, rms_norm_eps=1e-6,
        layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(s["layers"])],
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(
        hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_hidden"] // 16,
        image_size=s["image_size"], patch_size=s["patch_size"], model_type="siglip_vision_model")
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=_gemma3_image_tokens(s),
        boi_token_index=3, eoi_token_index=4, image_token_index=5, tie_word_embeddings=False)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    return Gemma3ForConditionalGeneration(config)


def _llama4(s: dict[str, int], vocab_size: int):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = dict(
        vocab_size=vocab_size, hidden_size=s["hidden"], intermediate_size=s["intermediate"] // 2,
        intermediate_size_mlp=s["intermediate"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        head_dim=s["hidden"] // s["heads"], num_local_experts=s["experts"], num_experts_per_tok=1,
        interleave_moe_layer_step=s["moe_step"], attention_chunk_size=s["chunk"],
        no_rope_layer_interval=4, use_qk_norm=True, attn_temperature_tuning=True,
        floor_scale=8, attn_scale=0.5, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
        bos_token_id=1, eos_token_id=2, pad_token_id=0, model_type="llama4_text")
    vision = dict(
        hidden_size=s["vision_hidden"], intermediate_size=4 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_hidden"] // 16,
        image_size=s["image_size"], patch_size=s["patch_size"], vision_output_dim=s["hidden"],
        projector_input_dim=s["hidden"], projector_output_dim=s["hidden"],
        pixel_shuffle_ratio=0.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        model_type="llama4_vision_model")
    config = Llama4Config(text_config=text, vision_config=vision, boi_token_index=5,
                          eoi_token_index=6, image_token_index=8, tie_word_embeddings=False)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    return Llama4ForConditionalGeneration(config)


def _init_weights(model, seed: int, embed_std: float = 1.0) -> None:
    """Fan-in scaled weights (std 1/sqrt(fan_in)), unit-std embeddings and a sharp lm_head.

    HF's default (std 0.02 everywhere) makes every layer a near no-op, so greedy output is a
    fixed token-to-token map that repeats, and images barely move the logits. With fan-in
    init each block, the projector and the image features all matter.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                continue                     # norms keep 1 / biases keep 0 from HF's init
            if "embed_tokens" in name:
                std = embed_std
            elif "lm_head" in name:
                std = 2.0 / p.shape[1] ** 0.5
            elif "position_embedding" in name or "class_embedding" in name:
                std = 0.02
            elif "mlp.experts." in name:         # Qwen3 fused experts [E, out, in]
                std = 1.0 / p.shape[-1] ** 0.5
            elif p.dim() == 3:               # fused experts [E, in, out] (Llama-4)
                std = 1.0 / p.shape[1] ** 0.5
            else:
                std = 1.0 / (p[0].numel() ** 0.5)   # fan-in (conv: in * kernel)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


# ---------------------------------------------------------------------- processor files
def _image_common() -> dict[str, Any]:
    """CLIP's normalisation and the usual rescale / resize switches."""
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    return dict(do_convert_rgb=True, do_resize=True, do_rescale=True, rescale_factor=1 / 255,
                do_normalize=True, image_mean=mean, image_std=std, resample=3)


def _llava_files(s: dict[str, int]) -> dict[str, dict]:
    size = s["image_size"]
    image = dict(image_processor_type="CLIPImageProcessor", processor_class="LlavaProcessor",
                 size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                 do_center_crop=True, **_image_common())
    processor = dict(processor_class="LlavaProcessor", patch_size=s["patch_size"],
                     vision_feature_select_strategy="default", num_additional_image_tokens=1,
                     image_token="<image>")
    return {"preprocessor_config.json": image, "processor_config.json": processor}


def _qwen2_vl_files(s: dict[str, int], processor: str = "Qwen2VLProcessor") -> dict[str, dict]:
    unit = s["patch_size"] * 2           # patch * merge_size: one merged token's side
    min_pixels, max_pixels = unit * unit, s["image_size"] ** 2
    vision = dict(patch_size=s["patch_size"], temporal_patch_size=2, merge_size=2,
                  size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                  min_pixels=min_pixels, max_pixels=max_pixels, **_image_common())
    image = dict(image_processor_type="Qwen2VLImageProcessor", processor_class=processor,
                 **vision)
    video = dict(video_processor_type="Qwen2VLVideoProcessor", processor_class=processor,
                 do_sample_frames=False, **vision)
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video,
            "processor_config.json": dict(processor_class=processor)}


def _gemma3_files(s: dict[str, int]) -> dict[str, dict]:
    size = s["image_size"]
    image = dict(image_processor_type="Gemma3ImageProcessor", processor_class="Gemma3Processor",
                 size={"height": size, "width": size}, do_pan_and_scan=False,
                 **{**_image_common(), "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                    "resample": 2})
    processor = dict(processor_class="Gemma3Processor", image_seq_length=_gemma3_image_tokens(s))
    return {"preprocessor_config.json": image, "processor_config.json": processor}


def _llama4_files(s: dict[str, int]) -> dict[str, dict]:
    side = {"height": s["image_size"], "width": s["image_size"]}
    image = dict(image_processor_type="Llama4ImageProcessor", processor_class="Llama4Processor",
                 size=side, max_patches=s["max_tiles"], resize_to_max_canvas=False,
                 **{**_image_common(), "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                    "resample": 2})
    processor = dict(processor_class="Llama4Processor", patch_size=s["patch_size"],
                     pixel_shuffle_ratio=0.5)
    return {"preprocessor_config.json": image, "processor_config.json": processor}


def _save_processor(builder: TinyFamily, s: dict[str, int], tokenizer, out: Path) -> None:
    tokenizer.chat_template = builder.chat_template
    tokenizer.save_pretrained(out)
    for name, d in builder.processor_files(s).items():
        (out / name).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(tokenizer.chat_template)


def _portable_configs(out: Path) -> None:
    """Keep the files loadable by older transformers 5.x: the generic fast-tokenizer class
    name, and no vision rope entry (newer releases fill in their own default)."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    cfg.get("vision_config", {}).pop("rope_parameters", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------- builds

def build_tiny(family: str, out: str | os.PathLike, **sizes: Any) -> Path:
    """Write a complete tiny checkpoint of `family` into `out` (created) and return its path."""
    import torch
    from transformers import GenerationConfig

    s = _sizes(family, sizes)
    builder = family_builder(family)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(builder, s["vocab"])
    vocab_size = len(tokenizer)
    torch.manual_seed(s["seed"])
    model = builder.model(s, vocab_size).float().eval()
    _init_weights(model, s["seed"], builder.embed_scale / s["hidden"] ** 0.5
                  if builder.embed_scale != 1.0 else 1.0)
    model.generation_config = GenerationConfig(
        do_sample=False, bos_token_id=1, eos_token_id=builder.eos_token_id, pad_token_id=0)
    model.save_pretrained(out, safe_serialization=True)
    _save_processor(builder, s, tokenizer, out)
    _portable_configs(out)
    (out / "tiny_sizes.json").write_text(json.dumps({"family": family, **s}, indent=2) + "\n")
    return out


def _cache_root() -> Path:
    env = os.environ.get("MMHPC_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache" / "tiny"


def tiny_checkpoint(family: str, **sizes: Any) -> Path:
    """The cached tiny checkpoint for (family, sizes), built once.

    Builds into a temporary directory beside the target and renames it into place, so
    concurrent callers (pytest-xdist, MPI ranks) never see a half-written checkpoint: the
    first rename wins and the others discard their copy.
    """
    s = _sizes(family, sizes)
    key = json.dumps({"v": BUILD_VERSION, "family": family, **s}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = _cache_root()
    final = root / f"{family}-{digest}"
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-{digest}-", dir=root))
    try:
        build_tiny(family, tmp, **s)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------ families
def _llava_check(s: dict[str, int]) -> None:
    if s["image_size"] % s["patch_size"]:
        raise ValueError("llava: patch_size must divide image_size")


def _qwen2_vl_check(s: dict[str, int]) -> None:
    if (s["hidden"] // s["heads"]) % 4:
        raise ValueError("qwen2_vl: head_dim must be a multiple of 4 (M-RoPE sections)")


LLAVA = TinyFamily(
    sizes=dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vision_layers=2,
               vision_hidden=32, image_size=32, patch_size=8, vocab=640, seed=0),
    specials=LLAVA_SPECIALS, chat_template=LLAVA_CHAT_TEMPLATE, tokenizer=_llama_tokenizer,
    model=_llava, processor_files=_llava_files, eos_token_id=2, check=_llava_check)

QWEN2_VL = TinyFamily(
    # image_size is the longest side budget: max_pixels = image_size**2.
    sizes=dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vision_layers=2,
               vision_hidden=32, image_size=112, patch_size=14, vocab=640, seed=0),
    specials=QWEN2_VL_SPECIALS, chat_template=QWEN2_VL_CHAT_TEMPLATE, tokenizer=_qwen_tokenizer,
    model=_qwen2_vl, processor_files=_qwen2_vl_files,
    eos_token_id=[2, 0],     # Qwen2-VL-Instruct stops on <|im_end|> and <|endoftext|>
    check=_qwen2_vl_check)


_QWEN3_VL_SIZES = dict(layers=3, hidden=64, heads=4, kv_heads=2, intermediate=128,
                       vision_layers=3, vision_hidden=32, image_size=128, patch_size=16,
                       vocab=640, seed=0)
QWEN3_VL = TinyFamily(
    sizes=_QWEN3_VL_SIZES, specials=QWEN2_VL_SPECIALS, chat_template=QWEN2_VL_CHAT_TEMPLATE,
    tokenizer=_qwen_tokenizer, model=_qwen3_vl,
    processor_files=lambda s: _qwen2_vl_files(s, "Qwen3VLProcessor"), eos_token_id=[2, 0],
    check=_qwen2_vl_check)
QWEN3_VL_MOE = TinyFamily(   # 8 experts of 48, top 2 (2I != hidden: either expert layout loads)
    sizes={**_QWEN3_VL_SIZES, "intermediate": 48, "experts": 8, "top_k": 2},
    specials=QWEN2_VL_SPECIALS, chat_template=QWEN2_VL_CHAT_TEMPLATE,
    tokenizer=_qwen_tokenizer, model=lambda s, v: _qwen3_vl(s, v, moe=True),
    processor_files=lambda s: _qwen2_vl_files(s, "Qwen3VLProcessor"), eos_token_id=[2, 0],
    check=_qwen2_vl_check)


def _llama4_check(s: dict[str, int]) -> None:
    if s["image_size"] % s["patch_size"] or (s["image_size"] // s["patch_size"]) % 2:
        raise ValueError("llama4: patch_size must divide image_size an even number of times")


LLAMA4 = TinyFamily(      # image_size: one tile's side; up to max_tiles tiles + a global view
    sizes=dict(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128, vision_layers=2,
               vision_hidden=32, image_size=32, patch_size=8, vocab=640, seed=0, experts=4,
               moe_step=2, chunk=16, max_tiles=4),
    specials=LLAMA4_SPECIALS, chat_template=LLAMA4_CHAT_TEMPLATE, tokenizer=_llama4_tokenizer,
    model=_llama4, processor_files=_llama4_files, eos_token_id=2, check=_llama4_check)


def _gemma3_check(s: dict[str, int]) -> None:
    if s["image_size"] % (2 * s["patch_size"]):
        raise ValueError("gemma3: 2 * patch_size must divide image_size (2 x 2 pooling)")


GEMMA3 = TinyFamily(      # served by engine.backend=transformers only (no native model)
    sizes=dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vision_layers=2,
               vision_hidden=32, image_size=32, patch_size=8, vocab=640, seed=0),
    specials=GEMMA3_SPECIALS, chat_template=GEMMA3_CHAT_TEMPLATE, tokenizer=_gemma3_tokenizer,
    model=_gemma3, processor_files=_gemma3_files,
    eos_token_id=[2, 7],     # <eos> and <end_of_turn>, as Gemma-3-it's generation config
    check=_gemma3_check, embed_scale=2.0)


def main(argv: list[str] | None = None) -> None:
    from mmhpc.models.registry import tiny_families
    families = tiny_families()
    p = argparse.ArgumentParser(prog="python -m mmhpc.tools.tiny", description=__doc__.split("\n")[0])
    p.add_argument("--family", required=True, choices=families)
    p.add_argument("--out", required=True)
    defaults = {f: default_sizes(f) for f in families}
    for name in dict.fromkeys(k for d in defaults.values() for k in d):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None,
                       help="default: " + ", ".join(f"{f} {d[name]}" for f, d in defaults.items()
                                                     if name in d))
    args = vars(p.parse_args(argv))
    family, out = args.pop("family"), args.pop("out")
    path = build_tiny(family, out, **{k: v for k, v in args.items() if v is not None})
    print(path)


if __name__ == "__main__":
    main()

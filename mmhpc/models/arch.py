"""Real-size architectures without a model hub: `arch:<name>` model paths.

The public config.json values of each checkpoint (and its image processor's) are written once
into a cache directory, so `AutoConfig` / `AutoImageProcessor` read them like a downloaded
checkpoint. With `model.random_weights=true` the engine then builds the full-size model on the
device: speed can be measured where no weights can be fetched.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

PREFIX = "arch:"

_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# CLIP ViT-L/14 at 336 px (LLaVA-1.5's and LLaVA-1.6's tower) and its image processor
_CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, image_size=336,
                   intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                   patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_CLIP_336_PREPROCESSOR = dict(
    do_resize=True, size={"shortest_edge": 336}, do_center_crop=True,
    crop_size={"height": 336, "width": 336}, do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, image_mean=_CLIP_MEAN, image_std=_CLIP_STD, do_convert_rgb=True,
    resample=3)
# Qwen2-VL-7B's and Qwen2.5-VL-7B's language model, special tokens and image processor
_QWEN_7B_TEXT = dict(
    bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
    vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655,
    video_token_id=151656, hidden_act="silu", hidden_size=3584, intermediate_size=18944,
    max_window_layers=28, num_attention_heads=28, num_hidden_layers=28, num_key_value_heads=4,
    rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768, tie_word_embeddings=False,
    torch_dtype="bfloat16", use_sliding_window=False, vocab_size=152064,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
_QWEN_PREPROCESSOR = dict(
    image_processor_type="Qwen2VLImageProcessor", do_resize=True, min_pixels=3136,
    max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
    image_mean=_CLIP_MEAN, image_std=_CLIP_STD, do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, do_convert_rgb=True, resample=3)

ARCHS: dict[str, dict] = {
    # llava-hf/llava-1.5-7b-hf
    "llava-1.5-7b": dict(
        config=dict(
            architectures=["LlavaForConditionalGeneration"], model_type="llava",
            image_token_index=32000, pad_token_id=32001, projector_hidden_act="gelu",
            vision_feature_layer=-2, vision_feature_select_strategy="default",
            tie_word_embeddings=False, vocab_size=32064, torch_dtype="float16",
            text_config=dict(model_type="llama", architectures=["LlamaForCausalLM"],
                             hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32,
                             max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064,
                             hidden_act="silu", rope_theta=10000.0, torch_dtype="float16"),
            vision_config=_CLIP_L_336),
        preprocessor=dict(image_processor_type="CLIPImageProcessor", **_CLIP_336_PREPROCESSOR),
        eos_token_ids=[2]),
    # Qwen/Qwen2-VL-7B-Instruct
    "qwen2-vl-7b": dict(
        config=dict(
            architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl",
            max_position_embeddings=32768, **_QWEN_7B_TEXT,
            vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3,
                               hidden_size=3584, patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2)),
        preprocessor=dict(processor_class="Qwen2VLProcessor", **_QWEN_PREPROCESSOR),
        eos_token_ids=[151645, 151643]),
    # llava-hf/llava-v1.6-mistral-7b-hf: CLIP-L/336 tower, anyres over 336 px tiles,
    # Mistral-7B-Instruct-v0.2 (no sliding window, rope_theta 1e6)
    "llava-v1.6-mistral-7b-hf": dict(
        config=dict(
            architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next",
            image_token_index=32000, pad_token_id=0, projector_hidden_act="gelu",
            vision_feature_layer=-2, vision_feature_select_strategy="default",
            image_grid_pinpoints=_PINPOINTS_336, use_image_newline_parameter=True,
            tie_word_embeddings=False, vocab_size=32064, torch_dtype="bfloat16",
            text_config=dict(model_type="mistral", architectures=["MistralForCausalLM"],
                             hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8,
                             max_position_embeddings=32768, rms_norm_eps=1e-5, vocab_size=32064,
                             hidden_act="silu", rope_theta=1000000.0, sliding_window=None,
                             torch_dtype="bfloat16"),
            vision_config=_CLIP_L_336),
        preprocessor=dict(image_processor_type="LlavaNextImageProcessor",
                          processor_class="LlavaNextProcessor", aspect_ratio_setting="anyres",
                          image_grid_pinpoints=_PINPOINTS_336, do_pad=True,
                          **_CLIP_336_PREPROCESSOR),
        eos_token_ids=[2]),
    # Qwen/Qwen2.5-VL-7B-Instruct: windowed ViT (112 px windows; full attention in blocks
    # 7, 15, 23, 31), RMSNorm + SwiGLU blocks; the Qwen2 decoder with M-RoPE
    "Qwen2.5-VL-7B-Instruct": dict(
        config=dict(
            architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
            max_position_embeddings=128000, **_QWEN_7B_TEXT,
            vision_config=dict(depth=32, hidden_act="silu", hidden_size=1280,
                               intermediate_size=3420, num_heads=16, in_chans=3,
                               out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                               spatial_patch_size=14, window_size=112,
                               fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
                               temporal_patch_size=2)),
        preprocessor=dict(processor_class="Qwen2_5_VLProcessor", **_QWEN_PREPROCESSOR),
        eos_token_ids=[151645, 151643]),
}




def _qwen3_vl(text: dict, moe: bool) -> dict:
    """A Qwen3-VL(-MoE) release's config: its text sizes over the shared ViT (27 layers,
    DeepStack from layers 8, 16, 24), tokens, interleaved M-RoPE and image processor."""
    arch = "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
    return dict(
        config=dict(
            architectures=[arch], model_type="qwen3_vl_moe" if moe else "qwen3_vl",
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
            vision_end_token_id=151653, tie_word_embeddings=False,
            text_config=dict(
                attention_bias=False, bos_token_id=151643, eos_token_id=151645, head_dim=128,
                tie_word_embeddings=False,                # the text config's default ties
                hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6,
                vocab_size=151936, rope_theta=5000000, dtype="bfloat16",
                rope_scaling={"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                              "rope_type": "default"}, **text),
            vision_config=dict(
                deepstack_visual_indexes=[8, 16, 24], depth=27, hidden_act="gelu_pytorch_tanh",
                hidden_size=1152, in_channels=3, intermediate_size=4304, num_heads=16,
                num_position_embeddings=2304, out_hidden_size=text["hidden_size"],
                patch_size=16, spatial_merge_size=2, temporal_patch_size=2)),
        preprocessor=dict(image_processor_type="Qwen2VLImageProcessor", do_resize=True,
                          size={"longest_edge": 16777216, "shortest_edge": 65536},
                          patch_size=16, temporal_patch_size=2, merge_size=2,
                          image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_rescale=True,
                          rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
                          resample=3),
        eos_token_ids=[151645, 151643])


def _qwen3_moe_text(hidden: int, layers: int, heads: int, expert_size: int) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=4, intermediate_size=3 * hidden, num_experts=128,
                num_experts_per_tok=8, moe_intermediate_size=expert_size, decoder_sparse_step=1,
                mlp_only_layers=[], norm_topk_prob=True)


ARCHS.update({
    # Qwen/Qwen3-VL-8B-Instruct
    "qwen3-vl-8b": _qwen3_vl(dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8), moe=False),
    # Qwen/Qwen3-VL-30B-A3B-Instruct: 30.5 B parameters, 3.0 B active
    "qwen3-vl-30b-a3b": _qwen3_vl(_qwen3_moe_text(2048, 48, 32, 768), moe=True),
    # Qwen/Qwen3-VL-235B-A22B-Instruct
    "qwen3-vl-235b-a22b": _qwen3_vl(_qwen3_moe_text(4096, 94, 64, 1536), moe=True),
})


def _llama4(num_experts: int, moe_step: int, use_qk_norm: bool, rope_scaling: dict | None,
            max_positions: int) -> dict:
    """meta-llama/Llama-4-{Scout-17B-16E,Maverick-17B-128E}-Instruct: the same attention,
    vision tower and tokens; they differ in experts, MoE interleave, QK norm and rotary."""
    return dict(
        config=dict(
            architectures=["Llama4ForConditionalGeneration"], model_type="llama4",
            boi_token_index=200080, eoi_token_index=200081, image_token_index=200092,
            tie_word_embeddings=False, torch_dtype="bfloat16",
            text_config=dict(
                model_type="llama4_text", attention_bias=False, attention_chunk_size=8192,
                attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
                bos_token_id=200000, eos_token_id=[200001, 200007, 200008], pad_token_id=200018,
                head_dim=128, hidden_act="silu", hidden_size=5120, intermediate_size=8192,
                intermediate_size_mlp=16384, interleave_moe_layer_step=moe_step,
                max_position_embeddings=max_positions, num_attention_heads=40,
                num_experts_per_tok=1, num_hidden_layers=48, num_key_value_heads=8,
                num_local_experts=num_experts, rms_norm_eps=1e-5, rope_scaling=rope_scaling,
                rope_theta=500000.0, router_aux_loss_coef=0.001, router_jitter_noise=0.0,
                use_qk_norm=use_qk_norm, vocab_size=202048, torch_dtype="bfloat16"),
            vision_config=dict(
                model_type="llama4_vision_model", hidden_act="gelu", hidden_size=1408,
                image_size=336, intermediate_size=5632, multi_modal_projector_bias=False,
                norm_eps=1e-5, num_attention_heads=16, num_channels=3, num_hidden_layers=34,
                patch_size=14, pixel_shuffle_ratio=0.5, projector_dropout=0.0,
                projector_input_dim=4096, projector_output_dim=4096, rope_theta=10000,
                vision_feature_layer=-1, vision_feature_select_strategy="default",
                vision_output_dim=4096)),
        preprocessor=dict(image_processor_type="Llama4ImageProcessorFast", do_resize=True,
                          size={"height": 336, "width": 336}, max_patches=16,
                          resize_to_max_canvas=False, do_rescale=True, rescale_factor=1 / 255,
                          do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                          do_convert_rgb=True, resample=2),
        eos_token_ids=[200001, 200007, 200008])


# meta-llama/Llama-4-Scout-17B-16E-Instruct (every layer MoE, QK norm, llama3 rotary scaling)
ARCHS["llama4-scout"] = _llama4(16, 1, True, {"rope_type": "llama3", "factor": 16.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                                               "original_max_position_embeddings": 8192},
                                10485760)
# meta-llama/Llama-4-Maverick-17B-128E-Instruct (MoE every 2nd layer, no QK norm)
ARCHS["llama4-maverick"] = _llama4(128, 2, False, None, 1048576)


def is_arch(path) -> bool:
    return str(path).startswith(PREFIX)


def arch_spec(path) -> dict:
    name = str(path)[len(PREFIX):]
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHS)}")
    return ARCHS[name]


def arch_dir(path) -> Path:
    """A directory holding the architecture's config.json and preprocessor_config.json."""
    name = str(path)[len(PREFIX):]
    spec = arch_spec(path)
    root = Path(os.environ.get("MMHPC_CACHE", Path.cwd() / ".cache")) / "arch" / name
    root.mkdir(parents=True, exist_ok=True)
    for fname, key in (("config.json", "config"), ("preprocessor_config.json", "preprocessor")):
        text = json.dumps(spec[key], indent=1)
        target = root / fname
        if not target.exists() or target.read_text() != text:
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(target)
    return root

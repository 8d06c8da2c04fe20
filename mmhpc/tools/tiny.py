"""Tiny random-weight multimodal checkpoints, built offline (no model hub).

`python -m mmhpc.tools.tiny --family llava|qwen2_vl|llama4|llama4_scout --out DIR [--layers N ...]` writes a
complete Hugging Face checkpoint directory: config.json, model.safetensors,
generation_config.json, a byte-level BPE tokenizer trained here on `corpus.py`, a chat
template, and the image/processor configs, so that `AutoModelForImageTextToText` and
`AutoProcessor` load it.

Token ids (both families): 0 = pad, 1 = bos, 2 = eos; the family's image tokens follow
(llava: 3 = `<image>`; qwen2_vl: see QWEN2_VL_SPECIALS, `<|image_pad|>` = 6; llama4: see
LLAMA4_SPECIALS, `<|patch|>` = 8).

llama4 is Maverick-like (MoE every `moe_step`=2 layers, dense between), llama4_scout is
Scout-like (every layer MoE); both with 4 experts, a NoPE layer every 4th, attention chunks of
16 tokens and temperature tuning from position 8 on, so short tests cross all of them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

FAMILIES = ("llava", "qwen2_vl", "llama4", "llama4_scout")
BUILD_VERSION = 2   # bump when the builder's output changes: cached builds are keyed on it

DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "llava": dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vision_layers=2,
                  vision_hidden=32, image_size=32, patch_size=8, vocab=640, seed=0),
    # qwen2_vl: image_size is the longest side budget: max_pixels = image_size**2.
    "qwen2_vl": dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vision_layers=2,
                     vision_hidden=32, image_size=112, patch_size=14, vocab=640, seed=0),
    # llama4: image_size is one tile's side; max_tiles tiles at most (+ a global view)
    "llama4": dict(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128, vision_layers=2,
                   vision_hidden=32, image_size=32, patch_size=8, vocab=640, seed=0, experts=4,
                   moe_step=2, chunk=16, max_tiles=4),
}
DEFAULT_SIZES["llama4_scout"] = dict(DEFAULT_SIZES["llama4"], moe_step=1)
MODEL_TYPES = {"llama4_scout": "llama4"}     # tiny family -> config.json model_type

LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<image>"]
LLAMA4_SPECIALS = ["<|finetune_right_pad|>", "<|begin_of_text|>", "<|eot|>", "<|header_start|>",
                   "<|header_end|>", "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                   "<|tile_x_separator|>", "<|tile_y_separator|>"]
QWEN2_VL_SPECIALS = ["<|endoftext|>", "<|bos|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>",
                     "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# llava-1.5 style: "USER: <image>\nWhat is this? ASSISTANT:"; the tokenizer prepends <s>.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '' }}"
    "{%- else -%}{{ message['role'] | upper }}{{ ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url', 'input_image') -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
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


def _sizes(family: str, sizes: dict[str, Any]) -> dict[str, int]:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    out = dict(DEFAULT_SIZES[family])
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
    if family == "llava" and s["image_size"] % s["patch_size"]:
        raise ValueError("llava: patch_size must divide image_size")
    if family.startswith("llama4") and (s["image_size"] % s["patch_size"] or
                                        (s["image_size"] // s["patch_size"]) % 2):
        raise ValueError("llama4: patch_size must divide image_size an even number of times")
    if family == "qwen2_vl" and (s["hidden"] // s["heads"]) % 4:
        raise ValueError("qwen2_vl: head_dim must be a multiple of 4 (M-RoPE sections)")
    return out


# ---------------------------------------------------------------------------- tokenizer
def _train_tokenizer(family: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from mmhpc.tools.corpus import corpus_lines

    specials = {"llava": LLAVA_SPECIALS, "qwen2_vl": QWEN2_VL_SPECIALS}.get(family, LLAMA4_SPECIALS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(), trainer)
    if family == "llava":   # Llama-style: every encoded text starts with <s>
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
        kw = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                  extra_special_tokens={"image_token": "<image>"})
    elif family.startswith("llama4"):   # the chat template writes <|begin_of_text|>
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        kw = dict(pad_token="<|finetune_right_pad|>", bos_token="<|begin_of_text|>",
                  eos_token="<|eot|>", extra_special_tokens={"image_token": "<|image|>"})
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        kw = dict(pad_token="<|endoftext|>", bos_token="<|bos|>", eos_token="<|im_end|>",
                  extra_special_tokens={"image_token": "<|image_pad|>",
                                        "video_token": "<|video_pad|>"})
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **kw)
    for i, t in enumerate(specials):
        assert tokenizer.convert_tokens_to_ids(t) == i, (t, i)
    return tokenizer


# ------------------------------------------------------------------------------- models
def _llava(s: dict[str, int], vocab_size: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_hidden"] // 16,
        image_size=s["image_size"], patch_size=s["patch_size"], projection_dim=s["vision_hidden"])
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
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


def _qwen2_vl(s: dict[str, int], vocab_size: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    head_dim = s["hidden"] // s["heads"]
    text = dict(
        vocab_size=vocab_size, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": _mrope_section(head_dim)},
        bos_token_id=1, eos_token_id=2, pad_token_id=0, model_type="qwen2_vl_text")
    vision = dict(
        depth=s["vision_layers"], embed_dim=s["vision_hidden"], hidden_size=s["hidden"],
        num_heads=s["vision_hidden"] // 16, mlp_ratio=2, patch_size=s["patch_size"],
        spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=6, video_token_id=7,
        vision_start_token_id=4, vision_end_token_id=5, tie_word_embeddings=False)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    return Qwen2VLForConditionalGeneration(config)


def _llama4(s: dict[str, int], vocab_size: int):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    head_dim = s["hidden"] // s["heads"]
    text = dict(
        vocab_size=vocab_size, hidden_size=s["hidden"], intermediate_size=s["intermediate"] // 2,
        intermediate_size_mlp=s["intermediate"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=head_dim,
        num_local_experts=s["experts"], num_experts_per_tok=1,
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


def _init_weights(model, seed: int) -> None:
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
                std = 1.0
            elif "lm_head" in name:
                std = 2.0 / p.shape[1] ** 0.5
            elif "position_embedding" in name or "class_embedding" in name:
                std = 0.02
            elif p.dim() == 3:               # fused experts [E, in, out] (Llama-4)
                std = 1.0 / p.shape[1] ** 0.5
            else:
                std = 1.0 / (p[0].numel() ** 0.5)   # fan-in (conv: in * kernel)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


# ---------------------------------------------------------------------- processor files
def _save_processor(family: str, s: dict[str, int], tokenizer, out: Path) -> None:
    tokenizer.chat_template = {"llava": LLAVA_CHAT_TEMPLATE, "qwen2_vl": QWEN2_VL_CHAT_TEMPLATE
                               }.get(family, LLAMA4_CHAT_TEMPLATE)
    tokenizer.save_pretrained(out)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    common = dict(do_convert_rgb=True, do_resize=True, do_rescale=True, rescale_factor=1 / 255,
                  do_normalize=True, image_mean=mean, image_std=std, resample=3)
    if family == "llava":
        size = s["image_size"]
        image = dict(image_processor_type="CLIPImageProcessor", processor_class="LlavaProcessor",
                     size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                     do_center_crop=True, **common)
        processor = dict(processor_class="LlavaProcessor", patch_size=s["patch_size"],
                         vision_feature_select_strategy="default", num_additional_image_tokens=1,
                         image_token="<image>")
        files = {"preprocessor_config.json": image}
    elif family.startswith("llama4"):
        side = {"height": s["image_size"], "width": s["image_size"]}
        image = dict(image_processor_type="Llama4ImageProcessor", processor_class="Llama4Processor",
                     size=side, max_patches=s["max_tiles"], resize_to_max_canvas=False,
                     **{**common, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2})
        processor = dict(processor_class="Llama4Processor", patch_size=s["patch_size"],
                         pixel_shuffle_ratio=0.5)
        files = {"preprocessor_config.json": image}
    else:
        unit = s["patch_size"] * 2           # patch * merge_size: one merged token's side
        min_pixels, max_pixels = unit * unit, s["image_size"] ** 2
        vision = dict(patch_size=s["patch_size"], temporal_patch_size=2, merge_size=2,
                      size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                      min_pixels=min_pixels, max_pixels=max_pixels, **common)
        image = dict(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2VLProcessor",
                     **vision)
        video = dict(video_processor_type="Qwen2VLVideoProcessor", processor_class="Qwen2VLProcessor",
                     do_sample_frames=False, **vision)
        processor = dict(processor_class="Qwen2VLProcessor")
        files = {"preprocessor_config.json": image, "video_preprocessor_config.json": video}
    files["processor_config.json"] = processor
    for name, d in files.items():
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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(family, s["vocab"])
    vocab_size = len(tokenizer)
    torch.manual_seed(s["seed"])
    build = {"llava": _llava, "qwen2_vl": _qwen2_vl}.get(family, _llama4)
    model = build(s, vocab_size).float().eval()
    _init_weights(model, s["seed"])
    if family != "qwen2_vl":
        gen = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:   # Qwen2-VL-Instruct stops on <|im_end|> and <|endoftext|>
        gen = dict(bos_token_id=1, eos_token_id=[2, 0], pad_token_id=0)
    model.generation_config = GenerationConfig(do_sample=False, **gen)
    model.save_pretrained(out, safe_serialization=True)
    _save_processor(family, s, tokenizer, out)
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


def hf_processor(path: str | os.PathLike):
    """HF's own processor for a checkpoint (the oracle's input side).

    `AutoProcessor` needs torchvision for Qwen2-VL (its video processor); where torchvision is
    missing, an image-only Qwen2VLProcessor (video_processor=None) stands in.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError:
        if json.loads((Path(path) / "config.json").read_text())["model_type"] != "qwen2_vl":
            raise
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = AutoTokenizer.from_pretrained(path)
    return ImageOnlyQwen2VLProcessor(image_processor=AutoImageProcessor.from_pretrained(path),
                                     tokenizer=tokenizer, video_processor=None,
                                     chat_template=tokenizer.chat_template)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mmhpc.tools.tiny", description=__doc__.split("\n")[0])
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument("--out", required=True)
    for name in dict.fromkeys(k for sizes in DEFAULT_SIZES.values() for k in sizes):
        defaults = ", ".join(f"{f} {d[name]}" for f, d in DEFAULT_SIZES.items() if name in d)
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None,
                       help=f"default: {defaults}")
    args = vars(p.parse_args(argv))
    family, out = args.pop("family"), args.pop("out")
    path = build_tiny(family, out, **{k: v for k, v in args.items() if v is not None})
    print(path)


if __name__ == "__main__":
    main()

"""Tiny offline checkpoints: they build, HF loads them, HF generate runs on them."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from mmhpc.tools.tiny import build_tiny, hf_processor, main, tiny_checkpoint

# (family, sizes): defaults, GQA 4:1, MHA, bigger images / other patch sizes.
SHAPES = [
    ("llava", {}),
    ("llava", dict(hidden=48, heads=4, kv_heads=1, image_size=56, patch_size=14, vocab=512)),
    ("qwen2_vl", {}),
    ("qwen2_vl", dict(hidden=96, heads=6, kv_heads=2, layers=3, vision_hidden=48, seed=3)),
    ("qwen2_vl", dict(kv_heads=4, patch_size=8, image_size=64)),
]


def _generate(path, image, max_new_tokens=8):
    from transformers import AutoModelForImageTextToText

    proc = hf_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return model, proc, out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("family,sizes", SHAPES, ids=lambda x: x if isinstance(x, str) else
                         "-".join(f"{k}{v}" for k, v in x.items()) or "default")
def test_build_load_generate(tmp_path, rng_image, family, sizes):
    path = build_tiny(family, tmp_path / family, **sizes)
    model, proc, new = _generate(path, rng_image(0, 48, 40))
    assert len(new) == 8
    assert len(set(new)) >= 3, f"degenerate greedy output {new}"
    cfg = json.loads((path / "config.json").read_text())
    tok = proc.tokenizer
    assert cfg["text_config"]["vocab_size"] == len(tok)
    assert cfg["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids(
        "</s>" if family == "llava" else "<|im_end|>")
    assert cfg["pad_token_id"] == tok.pad_token_id
    image_token = "<image>" if family == "llava" else "<|image_pad|>"
    assert model.config.image_token_id == tok.convert_tokens_to_ids(image_token)
    if family == "llava":
        assert tok("hi")["input_ids"][0] == tok.bos_token_id
    else:
        head_dim = cfg["text_config"]["hidden_size"] // cfg["text_config"]["num_attention_heads"]
        assert sum(cfg["text_config"]["rope_parameters"]["mrope_section"]) == head_dim // 2
    assert model.config.text_config.num_key_value_heads == sizes.get("kv_heads", 2)
    assert (path / "generation_config.json").exists()


def test_images_change_output(tiny_llava, tiny_qwen2_vl, rng_image):
    """The random weights must let the image steer generation (cache/hash tests rely on it)."""
    from PIL import Image

    for path in (tiny_llava, tiny_qwen2_vl):
        outs = {tuple(_generate(path, img, 12)[2]) for img in (
            rng_image(1, 56, 56), Image.new("RGB", (56, 56), (255, 0, 0)),
            Image.new("RGB", (56, 56), (0, 0, 255)))}
        assert len(outs) >= 2, path


def test_cached_checkpoint_concurrent(tmp_path, monkeypatch):
    monkeypatch.setenv("MMHPC_CACHE", str(tmp_path))
    paths, errors = [], []

    def build():
        try:
            paths.append(tiny_checkpoint("llava", layers=1))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]   # no temp dirs left
    assert tiny_checkpoint("llava", layers=1) == paths[0]
    assert tiny_checkpoint("llava", layers=2) != paths[0]


def test_cli(tmp_path, capsys):
    main(["--family", "qwen2_vl", "--out", str(tmp_path / "q"), "--layers", "1", "--vocab", "600"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_vl" and cfg["text_config"]["num_hidden_layers"] == 1


def test_bad_sizes():
    with pytest.raises(ValueError, match="kv_heads"):
        tiny_checkpoint("llava", heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="family"):
        tiny_checkpoint("gpt2")
    with pytest.raises(ValueError, match="unknown sizes"):
        tiny_checkpoint("llava", depth=3)

"""InputProcessor gives exactly HF's processor outputs (ids, pixel values, grids)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmhpc.multimodal.processor import InputProcessor, image_hash
from mmhpc.tools.tiny import hf_processor

# (name, image sizes (w, h)); text parts follow each image.
CASES = [
    ("text_only", []),
    ("one_image", [(48, 40)]),
    ("two_images", [(32, 32), (60, 45)]),
    ("mixed_sizes", [(100, 30), (28, 28), (77, 120)]),
]


def _messages(num_images: int) -> list[dict]:
    content = []
    for i in range(num_images):
        content += [{"type": "image"}, {"type": "text", "text": f"Picture {i}: what colour?"}]
    content.append({"type": "text", "text": "Describe the shapes."})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "llava_next", "qwen2_5_vl"])
def family_path(request, tiny_llava, tiny_qwen2_vl):
    from mmhpc.tools.tiny import tiny_checkpoint
    return {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl}.get(request.param) \
        or tiny_checkpoint(request.param)


@pytest.mark.parametrize("name,sizes", CASES, ids=[c[0] for c in CASES])
def test_matches_hf_processor(family_path, rng_image, name, sizes):
    ours, hf = InputProcessor(family_path), hf_processor(family_path)
    images = [rng_image(i, w, h) for i, (w, h) in enumerate(sizes)]
    prompt = ours.apply_chat_template(_messages(len(images)))
    assert prompt == hf.apply_chat_template(_messages(len(images)), add_generation_prompt=True)
    ids, items = ours.process(prompt, images)
    ref = hf(text=[prompt], images=images or None, return_tensors="pt")
    assert ids == ref["input_ids"][0].tolist()
    assert len(items) == len(images)
    for item, img in zip(items, images):
        assert ids[item.offset:item.offset + item.num_tokens] == [ours.image_token_id] * item.num_tokens
        assert item.offset == 0 or ids[item.offset - 1] != ours.image_token_id
        assert item.num_tokens == ours.num_image_tokens(*img.size)
        assert item.content_hash == image_hash(img)
    if not images:
        return
    if ours.family == "llava":
        pv = torch.cat([it.pixel_values for it in items])           # [n, 3, H, W]
        assert torch.equal(pv, ref["pixel_values"])
    elif ours.family == "llava_next":       # [images, most tiles, 3, S, S], zero-padded
        for k, it in enumerate(items):
            n = it.pixel_values.shape[0]
            assert torch.equal(it.pixel_values, ref["pixel_values"][k, :n])
            assert not ref["pixel_values"][k, n:].any()
        assert [list(it.image_size) for it in items] == ref["image_sizes"].tolist()
    else:
        pv = torch.cat([it.pixel_values for it in items])           # [patches, C*T*P*P]
        assert torch.equal(pv, ref["pixel_values"])
        assert [list(it.grid_thw) for it in items] == ref["image_grid_thw"].tolist()


def test_family_and_eos(tiny_llava, tiny_qwen2_vl):
    llava, qwen = InputProcessor(tiny_llava), InputProcessor(tiny_qwen2_vl)
    assert (llava.family, llava.image_token_id, llava.eos_token_ids) == ("llava", 3, [2])
    assert (qwen.family, qwen.image_token_id, qwen.eos_token_ids) == ("qwen2_vl", 6, [2, 0])
    assert llava.apply_chat_template([{"role": "user", "content": "hi"}]) == "USER: hi ASSISTANT:"
    assert qwen.apply_chat_template([{"role": "user", "content": "hi"}]).endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_image_url_parts_and_counts(tiny_qwen2_vl, rng_image):
    p = InputProcessor(tiny_qwen2_vl)
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/a.png"}}, {"type": "text", "text": "hi"}]}]
    prompt = p.apply_chat_template(msgs)
    assert "<|vision_start|><|image_pad|><|vision_end|>hi" in prompt
    with pytest.raises(ValueError, match="1 image placeholder.*2 image"):
        p.process(prompt, [rng_image(0, 28, 28), rng_image(1, 28, 28)])
    with pytest.raises(ValueError, match="0 image placeholder"):
        p.process("no images here", [rng_image(0, 28, 28)])


def test_hash_is_over_pixels(rng_image):
    img = rng_image(5, 30, 20)
    assert image_hash(img) == image_hash(img.copy()) == image_hash(img.convert("RGBA"))
    assert image_hash(img) != image_hash(rng_image(6, 30, 20))
    assert image_hash(img) != image_hash(img.resize((20, 30)))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_embedding_inputs(family, tiny_llava, tiny_qwen2_vl, rng_image):
    p = InputProcessor(tiny_llava if family == "llava" else tiny_qwen2_vl)
    prompt = p.apply_chat_template(_messages(2))
    emb = torch.randn(5, 64)
    ids, items = p.process(prompt, [emb, rng_image(0, 40, 40)])
    assert items[0].embeddings is emb and items[0].num_tokens == 5 and items[0].pixel_values is None
    assert ids.count(p.image_token_id) == 5 + items[1].num_tokens
    assert items[1].offset > items[0].offset + 5
    assert items[0].content_hash == p.process(prompt, [emb.clone(), rng_image(0, 40, 40)])[1][0].content_hash
    if family == "qwen2_vl":
        assert items[0].grid_thw == (1, 2, 10)
        _, (item, _) = p.process(prompt, [{"embeddings": emb[:4], "grid_thw": (1, 4, 4)},
                                          rng_image(0, 40, 40)])
        assert item.grid_thw == (1, 4, 4) and item.num_tokens == 4


def test_solid_colour_images(tiny_llava, tiny_qwen2_vl):
    for path in (tiny_llava, tiny_qwen2_vl):
        p, hf = InputProcessor(path), hf_processor(path)
        img = Image.new("L", (64, 50), 128)   # grayscale input: converted to RGB by both
        prompt = p.apply_chat_template(_messages(1))
        ids, _ = p.process(prompt, [img])
        assert ids == hf(text=[prompt], images=[img], return_tensors="pt")["input_ids"][0].tolist()


def test_anyres_counts_match_hf(rng_image):
    """LLaVA-NeXT: the frontend's count (no pixels) for images of many sizes and aspects
    (every pinpoint chosen; unpadding of rows and of columns) equals HF's processor."""
    from mmhpc.tools.tiny import tiny_checkpoint
    path = tiny_checkpoint("llava_next")
    ours, hf = InputProcessor(path), hf_processor(path)
    prompt = ours.apply_chat_template(_messages(1))
    seen = set()
    for i, (w, h) in enumerate([(32, 32), (64, 32), (32, 64), (64, 64), (96, 30), (30, 96),
                                (1920, 1080), (1080, 1920), (17, 200), (200, 17), (33, 65),
                                (500, 499), (7, 7)]):
        image = rng_image(i, w, h)
        want = hf(text=[prompt], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        ids, items = ours.process(prompt, [image], with_pixels=False)
        assert ids == want, (w, h)
        seen.add(items[0].num_tokens)
    assert len(seen) >= 6                                 # counts do depend on size and aspect

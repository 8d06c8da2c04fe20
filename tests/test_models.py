"""Layer/family oracles: our decoders over the paged cache vs HF forward, float32 CPU.
Checkpoints are built here with HF `save_pretrained` so these tests need nothing else."""
from __future__ import annotations

import pytest
import torch

from mmhpc.engine.sequence import MMItem
from mmhpc.models import load_model
from mmhpc.models.layers import AttentionMetadata, kv_cache_shape
from mmhpc.models.qwen2_vl import mrope_positions

torch.set_num_threads(1)
IMAGE = 250


def _llava(tmp, tie=False):
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         tie_word_embeddings=tie),
        image_token_id=IMAGE, vision_feature_layer=-2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    m = LlavaForConditionalGeneration(cfg).eval()
    m.save_pretrained(tmp)
    return m


def _qwen(tmp):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2),
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256,
                         rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=1e4)),
        image_token_id=IMAGE, vision_start_token_id=251, vision_end_token_id=252)
    torch.manual_seed(0)
    m = Qwen2VLForConditionalGeneration(cfg).eval()
    m.save_pretrained(tmp)
    return m


def _run(model, ids, positions, embeds_rows, chunks, block_size=4):
    """Prefill `ids` in the given chunk sizes over a fresh paged cache; logits of every token."""
    num_blocks = 16
    cache = torch.zeros(kv_cache_shape(model.text_config, num_blocks, block_size))
    table = list(range(num_blocks - 1, -1, -1))          # non-contiguous blocks on purpose
    out, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size
                              for p in range(start, start + n)])
        meta = AttentionMetadata(slots, [0, n], [start + n], [table], block_size)
        mm = None
        if embeds_rows is not None:
            rows, vals = embeds_rows
            keep = (rows >= start) & (rows < start + n)
            mm = (rows[keep] - start, vals[keep])
        pos = positions[..., sl]
        out.append(model.compute_logits(model(torch.tensor(ids[sl]), pos, meta, cache, mm)))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("tie", [False, True])
def test_llava_matches_hf_forward(tmp_path, tie):
    hf = _llava(tmp_path, tie)
    ours = load_model(tmp_path)
    ids = [1, 5, 7] + [IMAGE] * 4 + [9, 11, 13, 17, 19]
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
        [emb] = ours.encode([MMItem("h", 3, 4, pixel_values=pixels)])
        rows = torch.arange(3, 7)
        for chunks in ([len(ids)], [2, 3, 5, 2], [1] * len(ids)):
            got = _run(ours, ids, torch.arange(len(ids)), (rows, emb), chunks)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_qwen2_vl_matches_hf_forward(tmp_path):
    hf = _qwen(tmp_path)
    ours = load_model(tmp_path)
    grid = (1, 4, 6)                                   # 24 patches → 6 tokens
    ids = [1, 5, 251] + [IMAGE] * 6 + [252, 9, 11, 13]
    pixels = torch.randn(24, 3 * 2 * 14 * 14)
    with torch.no_grad():
        t = torch.tensor([ids])
        ref = hf(input_ids=t, pixel_values=pixels, image_grid_thw=torch.tensor([grid]),
                 mm_token_type_ids=(t == IMAGE).int()).logits[0]
        [emb] = ours.encode([MMItem("h", 3, 6, grid_thw=grid, pixel_values=pixels)])
        pos, delta = mrope_positions(ids, [grid], ours.config)
        for chunks in ([len(ids)], [4, 4, 5]):
            got = _run(ours, ids, pos, (torch.arange(3, 9), emb), chunks)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_mrope_positions_match_hf_get_rope_index(tmp_path):
    hf = _qwen(tmp_path)
    grids = [(1, 4, 6), (1, 2, 2), (1, 6, 4)]
    ids = [3, 251] + [IMAGE] * 6 + [252, 251] + [IMAGE] + [252, 7, 8, 251] + [IMAGE] * 6 + [252, 9]
    t = torch.tensor([ids])
    try:
        ref, ref_delta = hf.model.get_rope_index(t, (t == IMAGE).int(), torch.tensor(grids))
    except TypeError:                                          # older signature
        ref, ref_delta = hf.model.get_rope_index(t, torch.tensor(grids))
    pos, delta = mrope_positions(ids, grids, hf.config)
    assert torch.equal(pos, ref[:, 0]) and delta == int(ref_delta)
    pos, delta = mrope_positions([1, 2, 3], [], hf.config)
    assert torch.equal(pos, torch.arange(3).expand(3, -1)) and delta == 0


def test_random_weights_build_without_files(tmp_path):
    _qwen(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    model = load_model(tmp_path, random_weights=True)
    assert model.lm_head.weight.shape == (256, 64)


def _hf_inputs(path, sizes):
    """HF's processor output for one user turn with images of `sizes` (w, h) and the same
    prompt as engine input: ids and one MMItem per image (from our InputProcessor)."""
    import numpy as np
    from PIL import Image

    from mmhpc.multimodal.processor import InputProcessor
    from mmhpc.tools.tiny import hf_processor
    rng = np.random.default_rng(len(sizes))
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    proc = hf_processor(path)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "what is it?"}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}],
                                      add_generation_prompt=True, tokenize=False)
    ref = dict(proc(text=[prompt], images=images, return_tensors="pt"))
    ids, items = InputProcessor(path).process(prompt, images)
    assert ids == ref["input_ids"][0].tolist()
    return ref, ids, items


def _mm_rows(items):
    rows = torch.cat([torch.arange(it.offset, it.offset + it.num_tokens) for it in items])
    return rows


# (family, tiny sizes, image sizes (w, h)): two images of different sizes and aspects, so
# LLaVA-NeXT's tile grids and unpadding differ (and Qwen2.5-VL's windows: full and partial)
DENSE_VLM_CASES = {
    "llava_next": ("llava_next", {}, [(48, 40), (28, 84)]),
    "llava_next_mistral": ("llava_next", {"mistral": 1}, [(200, 33), (32, 32)]),
    "qwen2_5_vl": ("qwen2_5_vl", {}, [(112, 112), (84, 56)]),
}


@pytest.mark.parametrize("case", list(DENSE_VLM_CASES))
def test_dense_vlm_matches_hf_forward(case):
    from transformers import AutoModelForImageTextToText

    from mmhpc.tools.tiny import tiny_checkpoint
    family, sizes, image_sizes = DENSE_VLM_CASES[case]
    path = tiny_checkpoint(family, **sizes)
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path)
    ref, ids, items = _hf_inputs(path, image_sizes)
    with torch.no_grad():
        want = hf(**ref).logits[0]
        emb = torch.cat(ours.encode(items))
        if ours.uses_mrope:
            pos, _ = ours.mrope_positions(ids, [it.grid_thw for it in items])
        else:
            pos = torch.arange(len(ids))
        for chunks in ([len(ids)], [7] * (len(ids) // 7) + [len(ids) % 7]):
            got = _run(ours, ids, pos, (_mm_rows(items), emb), [c for c in chunks if c],
                       block_size=16)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        warm = ours.warm_up_items(300, 3)                   # the GPU runner's start-up batch
        assert [e.shape[0] for e in ours.encode(warm)] == [it.num_tokens for it in warm]


def test_qwen2_5_vl_mrope_positions_match_hf():
    from transformers import AutoModelForImageTextToText

    from mmhpc.tools.tiny import tiny_checkpoint
    path = tiny_checkpoint("qwen2_5_vl")
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    ref, ids, items = _hf_inputs(path, [(112, 112), (84, 56), (28, 28)])
    t = ref["input_ids"]
    try:
        want, want_delta = hf.model.get_rope_index(t, (t == hf.config.image_token_id).int(),
                                                   ref["image_grid_thw"])
    except TypeError:                                          # older signature
        want, want_delta = hf.model.get_rope_index(t, ref["image_grid_thw"])
    pos, delta = mrope_positions(ids, [it.grid_thw for it in items], hf.config)
    assert torch.equal(pos, want[:, 0]) and delta == int(want_delta)


def _qwen3(tmp, family):
    """A tiny Qwen3-VL(-MoE) from the project's builder (DeepStack: 2 levels over 3 layers)."""
    from transformers import AutoModelForImageTextToText
    from mmhpc.tools.tiny import build_tiny
    path = build_tiny(family, tmp, vocab=300)
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_qwen3_vl_matches_hf_forward(tmp_path, family):
    """QK-norm, interleaved M-RoPE, DeepStack (two images of different sizes, prefill in
    chunks that split an image) and, for the MoE, top-k renormalised experts."""
    hf = _qwen3(tmp_path, family)
    ours = load_model(tmp_path)
    img = hf.config.image_token_id
    grids = [(1, 4, 6), (1, 2, 4)]                    # 6 and 2 tokens, 16-px patches
    ids = [9, 5, 4] + [img] * 6 + [5, 9, 4] + [img] * 2 + [5, 11, 13]
    pixels = [torch.randn(24, 3 * 2 * 16 * 16), torch.randn(8, 3 * 2 * 16 * 16)]
    with torch.no_grad():
        t = torch.tensor([ids])
        ref = hf(input_ids=t, pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(grids),
                 mm_token_type_ids=(t == img).int()).logits[0]
        embs = ours.encode([MMItem("a", 3, 6, grid_thw=grids[0], pixel_values=pixels[0]),
                            MMItem("b", 12, 2, grid_thw=grids[1], pixel_values=pixels[1])])
        assert [e.shape for e in embs] == [(6, 3 * 64), (2, 3 * 64)]     # (1 + 2 levels) x hidden
        rows = torch.cat([torch.arange(3, 9), torch.arange(12, 14)])
        pos, _ = mrope_positions(ids, grids, ours.config)
        for chunks in ([len(ids)], [5, 4, 6, 2]):
            got = _run(ours, ids, pos, (rows, torch.cat(embs)), chunks)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        # without its DeepStack blocks the image is another one: the blocks are used
        plain = _run(ours, ids, pos, (rows, torch.cat(embs)[:, :64]), [len(ids)])
        assert (plain - ref).abs().max() > 1e-2


def test_moe_experts_load_in_either_layout(tmp_path):
    """Released Qwen3-VL-MoE checkpoints store fused experts [E, in, out]; HF 5.x saves
    [E, out, in]: both load to the same model."""
    from safetensors.torch import load_file, save_file
    _qwen3(tmp_path, "qwen3_vl_moe")
    want = dict(load_model(tmp_path).named_parameters())
    f = tmp_path / "model.safetensors"
    tensors = {k: (v.transpose(1, 2).contiguous() if ".experts." in k else v)
               for k, v in load_file(f).items()}
    save_file(tensors, f, metadata={"format": "pt"})
    got = dict(load_model(tmp_path).named_parameters())
    assert all(torch.equal(got[k], want[k]) for k in want)

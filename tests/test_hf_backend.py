"""The transformers backend (`engine.backend=transformers`, mmhpc/engine/hf_backend.py): a
second engine behind the aggregated role's interface. Greedy tokens equal HF `generate` on the
same processor inputs: in process for three families with requests interleaved step by step,
and over HTTP under real mpirun for tiny Gemma-3 (no native model), its worker rank apart from
the frontend (roles/aggregated.py through `make_engine`)."""
from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import make_image
from mpi_helpers import Deployment

MAX_TOKENS = 10


def _conversations():
    """(content parts, images): one image, two images, text only."""
    return [
        ([{"type": "image"}, {"type": "text", "text": "What is in the picture?"}],
         [make_image(1, 40, 56)]),
        ([{"type": "text", "text": "Describe"}, {"type": "image"}, {"type": "text", "text": "and"},
          {"type": "image"}], [make_image(2, 64, 48), make_image(3, 30, 30)]),
        ([{"type": "text", "text": "Hello there, tell me a story"}], []),
    ]


def _hf_reference(path, prompts_images, max_tokens=MAX_TOKENS) -> list[list[int]]:
    import torch
    from transformers import AutoModelForImageTextToText

    from mmhpc.tools.tiny import hf_processor
    hf = hf_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for prompt, images in prompts_images:
        inputs = hf(text=[prompt], images=images or None, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        out.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return out


@pytest.mark.parametrize("family", ["gemma3", "qwen2_vl", "llava"])
def test_engine_equals_hf_generate(family):
    from mmhpc.config import Config
    from mmhpc.engine.interface import AggregatedEngine, make_engine
    from mmhpc.engine.sequence import SamplingParams
    from mmhpc.tools.tiny import tiny_checkpoint
    path = tiny_checkpoint(family)
    cfg = Config.from_dict({"model": {"path": str(path), "dtype": "float32"},
                            "engine": {"backend": "transformers"}})
    engine = make_engine(cfg, "aggregated", device="cpu")
    assert isinstance(engine, AggregatedEngine)
    proc = engine.processor
    prompts = [(proc.apply_chat_template([{"role": "user", "content": c}]), ims)
               for c, ims in _conversations()]
    for i, (prompt, images) in enumerate(prompts):        # all admitted: steps interleave
        ids, items = proc.process(prompt, images)
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
                           items)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    want = _hf_reference(path, prompts)
    assert [got[f"r{i}"] for i in range(len(prompts))] == want
    assert len({tuple(w) for w in want}) == len(want)      # the images and prompts matter


def test_bad_requests_fail_alone():
    from mmhpc.config import Config
    from mmhpc.engine.interface import make_engine
    from mmhpc.engine.sequence import MMItem, SamplingParams
    from mmhpc.tools.tiny import tiny_checkpoint
    cfg = Config.from_dict({"model": {"path": str(tiny_checkpoint("gemma3")), "dtype": "float32",
                                      "max_model_len": 64},
                            "engine": {"backend": "transformers"}})
    engine = make_engine(cfg, "aggregated", device="cpu")
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("long", [1] * 64)
    with pytest.raises(ValueError, match="pre-computed"):
        engine.add_request("emb", [1, 5, 5], mm_items=[MMItem("h", 1, 2, embeddings=object())])
    with pytest.raises(ValueError, match="aggregated role only"):
        engine.add_request("p", [1, 2], prefill_only=True)
    with pytest.raises(ValueError, match="aggregated role only"):
        make_engine(cfg, "prefill")
    engine.add_request("ok", [1, 6, 20], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.add_request("gone", [1, 6, 21], SamplingParams(max_tokens=3))
    engine.abort_request("gone")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [o.request_id for o in outs] == ["ok"] * 3 and outs[-1].finish_reason == "length"


def test_config_refuses_disaggregated():
    from mmhpc.config import Config
    with pytest.raises(ValueError, match="deployment=agg"):
        Config.from_dict({"engine": {"backend": "transformers"},
                          "deployment": {"name": "ep_d", "aggregated": {"instances": 0},
                                         "prefill": {"instances": 1}, "decode": {"instances": 1}}})
    with pytest.raises(ValueError, match="native|transformers"):
        Config.from_dict({"engine": {"backend": "tensorrt"}})


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(client, model, content, images):
    it = iter(images)
    parts = [{"type": "image_url", "image_url": {"url": _data_url(next(it))}}
             if p["type"] == "image" else p for p in content]
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}],
                                       max_tokens=MAX_TOKENS, temperature=0)
    return r.choices[0].message.content, r.usage.completion_tokens


def test_http_gemma3_under_mpirun(tmp_path):
    """rank 0: frontend; rank 1: the aggregated worker on the transformers backend."""
    from openai import OpenAI

    from mmhpc.multimodal.processor import InputProcessor
    from mmhpc.tools.tiny import tiny_checkpoint
    path = tiny_checkpoint("gemma3")
    proc = InputProcessor(path)
    convs = _conversations()
    prompts = [(proc.apply_chat_template([{"role": "user", "content": c}]), ims)
               for c, ims in convs]
    want = []
    for tokens in _hf_reference(path, prompts):
        stop = next((i for i, t in enumerate(tokens) if t in proc.eos_token_ids), len(tokens))
        want.append((proc.decode(tokens[:stop]), min(len(tokens), stop + 1)))
    assert len({text for text, _ in want}) == len(want)
    dep = Deployment(2, ["model=tiny_gemma3", "engine.backend=transformers", "deployment=agg",
                         "deployment.frontend_shares_rank=false"], tmp_path / "job.log").start()
    try:
        client = OpenAI(base_url=dep.url + "/v1", api_key="x", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        with ThreadPoolExecutor(len(convs)) as pool:
            got = list(pool.map(lambda c: _chat(client, model, *c), convs))
        assert got == want
        stats = dep.ranks()
        assert stats[1]["role"] == "aggregated", stats
    finally:
        rc = dep.stop()
    assert rc in (0, 143, -15, None) or "Terminated" in dep.log(), dep.log()[-3000:]

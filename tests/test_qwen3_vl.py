"""Qwen3-VL and Qwen3-VL-MoE under real `mpirun`, over HTTP (openai client): greedy tokens
equal HF `generate(do_sample=False)` (float32, the tiny checkpoints) for text, one, two and
mixed-size images, sent concurrently, in agg, EP/D and E/P/D with two encoders (the MoE's
prefill `tp=2` over its experts, decode `tp=1`). DeepStack features travel encode → prefill
in the embedding rows; embeddings files carry them (and a file without them is a 400)."""
from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mpi_helpers import Deployment
from test_oracle import Oracle, image

N = 8                                   # tokens per request (ignore_eos: always N)
# All 6 pass (21:33 UTC 2026-12-06, shared 2-core box: agg ~45 s, E/P/D ~2 min each, mostly
# start-up); the default tier keeps agg-qwen3_vl and the MoE E/P/D (two encoders, prefill
# tp=2 over its experts, decode tp=1), the rest is `slow`.
E2 = ["deployment=e_p_d", "deployment.encode.instances=2"]
CASES = [pytest.param(c[:4], id=c[0], marks=c[4]) for c in [
    ("agg-qwen3_vl", "qwen3_vl", 1, ["deployment=agg"], ()),
    ("ep_d-qwen3_vl", "qwen3_vl", 3, ["deployment=ep_d"], pytest.mark.slow),
    ("e2_p_d-qwen3_vl", "qwen3_vl", 5, E2, pytest.mark.slow),
    ("agg-qwen3_vl_moe", "qwen3_vl_moe", 1, ["deployment=agg"], pytest.mark.slow),
    ("ep_d-qwen3_vl_moe", "qwen3_vl_moe", 3, ["deployment=ep_d"], pytest.mark.slow),
    ("e2_p2_d-qwen3_vl_moe", "qwen3_vl_moe", 6,
     [*E2, "deployment.prefill.tp=2", "deployment.prefill.ep=2"], ()),
]]
PROMPTS = {   # case -> (text, image (w, h, seed) list): test_oracle's cases
    "text": ("tell me a story about the sea", []),
    "one_image": ("what is in the picture?", [(32, 32, 1)]),
    "two_images": ("compare these two", [(32, 32, 2), (48, 40, 3)]),
    "sizes": ("describe", [(112, 56, 4), (28, 84, 5), (70, 70, 6)]),
}
_ORACLES: dict[str, Oracle] = {}


def oracle(family: str) -> Oracle:
    if family not in _ORACLES:
        _ORACLES[family] = Oracle(family)
    return _ORACLES[family]


def hf_tokens(family: str, text: str, images) -> list[tuple[str, float]]:
    """HF's greedy tokens as (the server's string for the token, its logprob): the chosen
    ids compared through their strings and logprobs (the API returns no ids)."""
    o = oracle(family)
    inputs = o.inputs(text, images)
    with torch.no_grad():
        out = o.hf.generate(**inputs, generation_config=o.gen, max_new_tokens=N,
                            output_scores=True, return_dict_in_generate=True)
    ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    lps = [torch.log_softmax(sc[0].float(), -1)[t].item() for sc, t in zip(out.scores, ids)]
    return [(o.proc.tokenizer.decode([t]), lp) for t, lp in zip(ids, lps)]


def same_tokens(response, want: list[tuple[str, float]]) -> bool:
    got = [(c.token, c.logprob) for c in response.choices[0].logprobs.content]
    return len(got) == len(want) == response.usage.completion_tokens and all(
        g[0] == w[0] and abs(g[1] - w[1]) < 1e-3 for g, w in zip(got, want))


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module", params=CASES)
def deployment(request, tmp_path_factory):
    name, family, ranks, overrides = request.param
    media = tmp_path_factory.mktemp(name + "-media")
    dep = Deployment(ranks, [f"model=tiny_{family}", *overrides,
                             f"media.allowed_local_path={media}"],
                     tmp_path_factory.mktemp(name) / "job.log").start()
    dep.family, dep.media = family, media
    yield dep
    rc = dep.stop()
    assert rc in (0, 143, -15, None) or "Terminated" in dep.log(), dep.log()[-3000:]


def _client(dep):
    from openai import OpenAI
    client = OpenAI(base_url=dep.url + "/v1", api_key="x", max_retries=0, timeout=120)
    return client, client.models.list().data[0].id


def _ask(client, model, text: str, urls: list[str]):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    content.append({"type": "text", "text": text})
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=N,
        temperature=0, logprobs=True, extra_body={"ignore_eos": True})


def _encoded(dep) -> list[int]:
    """Images encoded or files loaded by each encode rank (E/P/D), in rank order."""
    if dep.num_ranks == 1:
        return []
    ranks = dep.ranks()
    return [s.get("num_encoded", 0) + s.get("num_loaded", 0)
            for _, s in sorted(ranks.items()) if s.get("role") == "encode"]


def test_oracle_over_http(deployment):
    """Every case at once, each twice (the second pair hits the encode cache)."""
    client, model = _client(deployment)
    cases = [(text, [image(*s) for s in sizes]) for text, sizes in PROMPTS.values()] * 2
    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda c: _ask(client, model, c[0], [_data_url(i) for i in c[1]]),
                            cases))
    want = [hf_tokens(deployment.family, text, imgs) for text, imgs in cases]
    assert all(same_tokens(r, w) for r, w in zip(got, want)), \
        [([(c.token, c.logprob) for c in r.choices[0].logprobs.content], w)
         for r, w in zip(got, want)]
    encoded = _encoded(deployment)
    if len(encoded) == 2:                   # both encoders took images
        end = time.monotonic() + 10
        while not all(encoded):
            assert time.monotonic() < end, deployment.ranks()
            time.sleep(0.3)
            encoded = _encoded(deployment)


def _image_bundle(family: str, img):
    """HF's own ViT outputs for one image: embeddings [n, hidden], DeepStack [L, n, hidden]
    and the grid."""
    o = oracle(family)
    inputs = o.inputs("x", [img])
    with torch.no_grad():
        out = o.hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                            return_dict=True)
    return out.pooler_output[0], torch.stack([d[0] for d in out.deepstack_features]), \
        inputs["image_grid_thw"]


def test_embedding_files_carry_deepstack(deployment):
    """An image's HF ViT outputs saved as a .pt dict (DeepStack blocks beside the embeddings)
    and as one [n, (1 + L) hidden] .safetensors tensor answer exactly as the image does; a file
    with the embeddings alone is a 400 that names what is missing."""
    import openai
    from safetensors.torch import save_file

    family, media = deployment.family, deployment.media
    img = image(48, 40, 3)
    emb, deep, grid = _image_bundle(family, img)
    torch.save({"mm_embeddings": emb, "deepstack_embeddings": deep, "image_grid_thw": grid},
               media / "img.pt")
    save_file({"mm_embeddings": torch.cat([emb, *deep], dim=1).contiguous(),
               "image_grid_thw": grid}, str(media / "img.safetensors"))
    torch.save({"mm_embeddings": emb, "image_grid_thw": grid}, media / "flat.pt")
    client, model = _client(deployment)
    want = hf_tokens(family, "what is in the picture?", [img])
    for name in ("img.pt", "img.safetensors"):
        r = _ask(client, model, "what is in the picture?", [str(media / name)])
        assert same_tokens(r, want), name
    with pytest.raises(openai.BadRequestError) as bad:
        _ask(client, model, "what is in the picture?", [str(media / "flat.pt")])
    assert bad.value.status_code == 400 and "missing_deepstack" in str(bad.value.body)
    assert "deepstack_embeddings" in str(bad.value.body)

"""LLaVA-NeXT and Qwen2.5-VL over HTTP under real `mpirun`, in agg, EP/D and E/P/D (and tp=2
in the slow tier): greedy tokens equal HF `generate` for text, one image, and two images of
different sizes and aspects (LLaVA-NeXT: different tile grids and unpadding; Qwen2.5-VL: full
and partial windows), sent concurrently; the frontend's counts (`usage.prompt_tokens`,
`/tokenize`) equal HF's processor. Each deployment starts once per module; cases are data."""
from __future__ import annotations

import json
import urllib.request

import pytest

from mpi_helpers import Deployment
from test_tp import HF, MPIRUN, _image, _png_url, assert_oracle_over_http

REQUESTS = [("tell me a story about the sea", []),
            ("what is in the picture?", [(70, 50, 1)]),
            ("compare these two", [(112, 112, 2), (30, 84, 3)])]

_SLOW = pytest.mark.slow
# (id, family, tiny sizes, ranks, overrides)
CASES = [pytest.param(tuple(case), id=case[0], marks=marks) for *case, marks in [
    ("e_p_d-llava_next", "llava_next", {}, 4, ["deployment=e_p_d"], ()),
    ("ep_d-qwen2_5_vl", "qwen2_5_vl", {}, 3, ["deployment=ep_d"], _SLOW),
    ("agg-llava_next", "llava_next", {}, 1, ["deployment=agg"], _SLOW),
    ("ep_d-llava_next", "llava_next", {}, 3, ["deployment=ep_d"], _SLOW),
    ("agg-qwen2_5_vl", "qwen2_5_vl", {}, 1, ["deployment=agg"], _SLOW),
    ("e_p_d-qwen2_5_vl", "qwen2_5_vl", {}, 4, ["deployment=e_p_d"], _SLOW),
    ("e_p_d-llava_next_mistral", "llava_next", {"mistral": 1}, 4, ["deployment=e_p_d"], _SLOW),
    ("agg_tp2-qwen2_5_vl-kv1", "qwen2_5_vl", {"kv_heads": 1}, 2,
     ["deployment=agg", "deployment.aggregated.tp=2"], _SLOW),
    ("e_p1_d2-llava_next", "llava_next", {}, 5, ["deployment=e_p_d", "deployment.decode.tp=2"],
     _SLOW),
]]


@pytest.fixture(scope="module", params=CASES)
def deployment(request, tmp_path_factory):
    from mmhpc.tools.tiny import tiny_checkpoint
    name, family, sizes, ranks, overrides = request.param
    path = tiny_checkpoint(family, **sizes)
    dep = Deployment(ranks, [f"model.path={path}", "model.max_model_len=512", *overrides],
                     tmp_path_factory.mktemp(name) / "job.log").start()
    yield dep, path, HF(path)
    rc = dep.stop()
    assert rc in (0, 143, -15, None) or "Terminated" in dep.log(), dep.log()[-3000:]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _messages(text: str, images: list) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": _png_url(im)}} for im in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_oracle_over_http(deployment):
    dep, path, hf = deployment
    assert_oracle_over_http(dep.url, path.name, hf, REQUESTS)


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_counts_match_hf(deployment):
    """usage.prompt_tokens and /tokenize's count: HF's processor's prompt length."""
    import openai
    dep, path, hf = deployment
    client = openai.OpenAI(base_url=dep.url + "/v1", api_key="none", max_retries=0, timeout=120)
    for text, sizes in REQUESTS:
        images = [_image(*s) for s in sizes]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = hf.proc.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)
        want = hf.proc(text=[prompt], images=images or None,
                       return_tensors="pt")["input_ids"][0].tolist()
        got = _post(dep.url + "/tokenize", {"model": path.name,
                                            "messages": _messages(text, images)})
        assert got["tokens"] == want and got["count"] == len(want)
        r = client.chat.completions.create(model=path.name, messages=_messages(text, images),
                                           max_tokens=1, temperature=0)
        assert r.usage.prompt_tokens == len(want)

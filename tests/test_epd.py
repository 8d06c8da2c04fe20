"""E/P/D under real `mpirun`: greedy text over HTTP (openai client, 16 concurrent requests,
with and without images; pre-computed embeddings files, local and fetched, alone and mixed
with an image) equals `mmhpc.LLM` offline output (itself oracle-tested against HF).
Each deployment starts once per module; cases are data."""
from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import pytest

from mpi_helpers import Deployment
from conftest import CodeRunningPickle, make_image

MAX_TOKENS = 12
NUM_REQUESTS = 16

# (id, family, ranks, overrides, marks): issue 5's set is agg (1 rank), EP/D, E/P/D and E/P/D
# 2 prefill x 2 decode for both tiny families. All 8 pass (5:44 with test_failure on the shared
# 2-core box); to keep the default tier near 4 min it runs one family per deployment,
# alternating, and the other family, more agg instances and a shared rank 0 are `slow`.
E_P2_D2 = ["deployment=e_p_d", "deployment.prefill.instances=2", "deployment.decode.instances=2"]
AGG2 = ["deployment=agg", "deployment.aggregated.instances=2"]
_SLOW = pytest.mark.slow
CASES = [pytest.param(tuple(case), id=case[0], marks=marks) for *case, marks in [
    ("agg-llava", "llava", 1, ["deployment=agg"], ()),
    ("agg-qwen2_vl", "qwen2_vl", 1, ["deployment=agg"], _SLOW),
    ("ep_d-llava", "llava", 3, ["deployment=ep_d"], _SLOW),
    ("ep_d-qwen2_vl", "qwen2_vl", 3, ["deployment=ep_d"], ()),
    ("e_p_d-llava", "llava", 4, ["deployment=e_p_d"], ()),
    ("e_p_d-qwen2_vl", "qwen2_vl", 4, ["deployment=e_p_d"], _SLOW),
    ("e_p2_d2-llava", "llava", 6, E_P2_D2, _SLOW),
    ("e_p2_d2-qwen2_vl", "qwen2_vl", 6, E_P2_D2, ()),
    ("agg2-llava", "llava", 2, AGG2, _SLOW),            # rank 0: frontend + instance 0
    ("agg2_alone-qwen2_vl", "qwen2_vl", 3, [*AGG2, "deployment.frontend_shares_rank=false"],
     _SLOW),
    ("e_p_d_shared-qwen2_vl", "qwen2_vl", 3, ["deployment=e_p_d",
                                               "deployment.frontend_shares_rank=true"], _SLOW),
    ("e2_p_d-llava", "llava", 5, ["deployment=e_p_d", "deployment.encode.instances=2"], _SLOW),
]]


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _requests(family: str) -> list[tuple[str, object | None]]:
    """(text, image or None): half with images (two repeated: the encode cache), half text."""
    sizes = [(40, 56), (64, 48), (30, 30), (72, 40)]
    out = []
    for i in range(NUM_REQUESTS):
        if i % 2:
            out.append((f"Say something about number {i}.", None))
        else:
            w, h = sizes[(i // 2) % len(sizes)]
            out.append((f"Describe picture {i % 6}.", make_image(i % 6, w, h)))
    return out


_EXPECTED: dict[str, list[str]] = {}


def expected(family: str) -> list[str]:
    if family not in _EXPECTED:
        from mmhpc.engine.sequence import SamplingParams
        llm = offline_llm(family)
        prompts = []
        for text, image in _requests(family):
            parts = [{"type": "text", "text": text}]
            if image is not None:
                parts.append({"type": "image", "image": image})
            prompts.append([{"role": "user", "content": parts}])
        outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
        _EXPECTED[family] = [o.text for o in outs]
    return _EXPECTED[family]


def offline_llm(family: str):
    if family not in _LLM:
        from mmhpc import LLM
        from mmhpc.tools.tiny import tiny_checkpoint
        _LLM[family] = LLM(str(tiny_checkpoint(family)), max_model_len=512)
    return _LLM[family]


_LLM: dict = {}


@pytest.fixture(scope="module", params=CASES)
def deployment(request, tmp_path_factory):
    name, family, ranks, overrides = request.param
    media = tmp_path_factory.mktemp(name + "-media")     # embeddings files (local paths)
    dep = Deployment(ranks, [f"model=tiny_{family}", *overrides,
                             f"media.allowed_local_path={media}", "media.allow_private_urls=true"],
                     tmp_path_factory.mktemp(name) / "job.log").start()
    dep.family, dep.media = family, media
    yield dep
    rc = dep.stop()
    assert rc in (0, 143, -15, None) or "Terminated" in dep.log(), dep.log()[-3000:]


def _chat(client, model: str, text: str, image) -> str:
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": _data_url(image)}})
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}],
                                       max_tokens=MAX_TOKENS, temperature=0)
    return r.choices[0].message.content


def test_oracle_concurrent(deployment):
    from openai import OpenAI
    client = OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    reqs = _requests(deployment.family)
    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        got = list(pool.map(lambda r: _chat(client, model, *r), reqs))
    assert got == expected(deployment.family)


def test_stop_string(deployment):
    """A stop string ends the request on the rank that samples (workers detokenize only the
    requests that have stop strings) and is cut from the text, as offline."""
    from openai import OpenAI
    client = OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    text, image = _requests(deployment.family)[0]
    full = expected(deployment.family)[0]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    parts = [{"type": "text", "text": text},
             {"type": "image_url", "image_url": {"url": _data_url(image)}}]
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}],
                                       max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < MAX_TOKENS


PENALTIES = dict(frequency_penalty=0.8, presence_penalty=0.4, repetition_penalty=1.3,
                 logit_bias={5: 3.0, 6: -100.0})


def test_penalties_match_offline(deployment):
    """Penalties and logit_bias travel to the rank that samples the first token (prefill)
    and to the one that samples the rest (decode): the same text as offline."""
    from openai import OpenAI

    from mmhpc.engine.sequence import SamplingParams
    client = OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    text, image = _requests(deployment.family)[0]
    parts = [{"type": "text", "text": text},
             {"type": "image_url", "image_url": {"url": _data_url(image)}}]
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": parts}], max_tokens=MAX_TOKENS,
        temperature=0, frequency_penalty=PENALTIES["frequency_penalty"],
        presence_penalty=PENALTIES["presence_penalty"],
        logit_bias={str(k): v for k, v in PENALTIES["logit_bias"].items()},
        extra_body={"repetition_penalty": PENALTIES["repetition_penalty"]})
    want = offline_llm(deployment.family).generate(
        [[{"role": "user", "content": [{"type": "text", "text": text},
                                       {"type": "image", "image": image}]}]],
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, **PENALTIES))[0].text
    assert want != expected(deployment.family)[0]
    assert r.choices[0].message.content == want


def test_prefix_affinity(deployment):
    """With two prefill (or aggregated) instances, a prompt goes back to the instance that
    holds its prefix: X and Y are served once (Y while X runs), then Y alone (least-loaded
    alone would pick the first instance, whichever held it) and X beside it: both find every
    block a lookup can hit cached (streamed usage reports it). They share only the chat
    template's first blocks: with `deployment.cache_affinity=0` this fails."""
    import threading

    from openai import OpenAI
    roles = [s["role"] for s in deployment.ranks().values()] if deployment.num_ranks > 1 else []
    if max(roles.count("prefill"), roles.count("aggregated")) < 2:
        pytest.skip("one prefill instance: nothing to choose")
    client = OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    prompts = {k: [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(make_image(seed, 64, 48))}},
        {"type": "text", "text": f"Picture {k}: what do you see there?"}]}] for k, seed in
        (("X", 21), ("Y", 22))}

    def held_beside(first: str, second: str) -> dict[str, tuple[int, int]]:
        """`first` streamed (held in flight), `second` sent once it has a token; each one's
        (prompt tokens, cached tokens)."""
        got: dict[str, tuple[int, int]] = {}
        started = threading.Event()

        def stream():
            chunks = client.chat.completions.create(
                model=model, messages=prompts[first], max_tokens=48, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            for c in chunks:
                started.set()
                if c.usage is not None:
                    got[first] = (c.usage.prompt_tokens, _cached(c.usage))
        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        r = client.chat.completions.create(model=model, messages=prompts[second], max_tokens=2,
                                           temperature=0)
        got[second] = (r.usage.prompt_tokens, _cached(r.usage))
        t.join(60)
        return got

    first = held_beside("X", "Y")
    again = held_beside("Y", "X")
    block = 16                                              # cache.block_size
    for k, (num_prompt, num_cached) in again.items():       # every block a lookup can hit
        assert num_cached == (num_prompt - 1) // block * block, (k, first, again)


def test_image_affinity(deployment):
    """With two encoders, an image goes back to the encoder that has its embeddings: X's and
    Y's images are encoded once each (Y while X runs: on the other encoder), then Y alone
    and X beside it are both encode-cache hits (least-loaded alone: Y to X's encoder, X to
    the other, no hit)."""
    import threading

    from openai import OpenAI
    if deployment.num_ranks == 1:
        pytest.skip("one rank")
    encoders = [r for r, s in deployment.ranks().items() if s["role"] == "encode"]
    if len(encoders) < 2:
        pytest.skip("one encoder: nothing to choose")
    client = OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id

    def ask(seed: int, max_tokens: int, started: threading.Event | None = None) -> None:
        parts = [{"type": "image_url", "image_url": {"url": _data_url(make_image(seed, 40, 40))}},
                 {"type": "text", "text": "What is this?"}]
        chunks = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": parts}], max_tokens=max_tokens,
            temperature=0, stream=True, extra_body={"ignore_eos": True})
        for _ in chunks:
            if started is not None:
                started.set()

    def held_beside(first: int, second: int) -> None:
        started = threading.Event()
        t = threading.Thread(target=ask, args=(first, 48, started))
        t.start()
        assert started.wait(60)
        ask(second, 2)
        t.join(60)

    def totals() -> dict:
        ranks = deployment.ranks()
        return {k: sum(ranks[r].get(k, 0) for r in encoders)
                for k in ("num_encoded", "num_cache_hits")}

    def baseline() -> dict:
        """The encoders' totals from this module's earlier tests, once two reads more than a
        heartbeat (2 s by default) apart agree: their last reports are in."""
        import time
        last, end = totals(), time.monotonic() + 12
        while time.monotonic() < end:
            time.sleep(2.5)
            now = totals()
            if now == last:
                return now
            last = now
        return last

    def settled(key: str, want: int) -> dict:
        """The encoders' `key` count since the baseline once heartbeats (every
        timeouts.heartbeat_s) report `want`, or what they report after 10 s."""
        import time
        end = time.monotonic() + 10
        while True:
            ranks = deployment.ranks()
            got = sum(ranks[r].get(key, 0) for r in encoders) - base[key]
            if got == want or time.monotonic() > end:
                return {"since_baseline": got, **{r: ranks[r] for r in encoders}}
            time.sleep(0.3)

    base = baseline()
    held_beside(31, 32)
    got = settled("num_encoded", 2)
    assert got["since_baseline"] == 2, got
    held_beside(32, 31)
    got = settled("num_cache_hits", 2)
    assert got["since_baseline"] == 2, got


def _cached(usage) -> int:
    details = getattr(usage, "prompt_tokens_details", None)
    return (details.cached_tokens or 0) if details is not None else 0


def test_stream_and_blocks_freed(deployment):
    from openai import OpenAI
    client = OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    text, image = _requests(deployment.family)[0]
    parts = [{"type": "text", "text": text},
             {"type": "image_url", "image_url": {"url": _data_url(image)}}]
    stream = client.chat.completions.create(model=model, stream=True, max_tokens=MAX_TOKENS, temperature=0,
                                            messages=[{"role": "user", "content": parts}])
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == expected(deployment.family)[0]
    if deployment.num_ranks > 1:
        import time
        end = time.monotonic() + 15
        while time.monotonic() < end:
            ranks = deployment.ranks()
            kv = [s for s in ranks.values() if s["role"] in ("prefill", "decode")]
            if all(s["num_free_blocks"] + s.get("num_cached_blocks", 0) >= s["num_total_blocks"]
                   and not s.get("num_retained") for s in kv):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"blocks not freed: {deployment.ranks()}")


def test_embedding_files(deployment):
    """Pre-computed embeddings files in every deployment: the frontend checks and hashes them,
    the rank that encodes loads them again (a local file by path, re-checked; a fetched one from
    its bytes) into its embedding pool: no tensor rides ZeroMQ. Dict-style .pt with an extra
    key; for Qwen2-VL a non-default M-RoPE grid from the file. A pickle payload gets a 400."""
    import time

    import openai
    import torch
    from safetensors.torch import save_file

    from imgserver import ImageServer
    from mmhpc.engine.sequence import SamplingParams
    from mmhpc.server.media import text_hidden_size
    from mmhpc.tools.tiny import tiny_checkpoint

    family, media = deployment.family, deployment.media
    llm = offline_llm(family)
    hidden = text_hidden_size(tiny_checkpoint(family))
    gen = torch.Generator().manual_seed(7)
    emb, emb2 = torch.randn(6, hidden, generator=gen), torch.randn(4, hidden, generator=gen)
    entry: dict = {"mm_embeddings": emb, "note": torch.tensor([1, 2])}
    emb_in: object = emb
    if family == "qwen2_vl":
        m = llm.engine.processor.merge_size
        entry["image_grid_thw"] = torch.tensor([[1, 2 * m, 3 * m]])     # not the default grid
        emb_in = {"embeddings": emb, "grid_thw": (1, 2 * m, 3 * m)}
    torch.save(entry, media / "emb.pt")
    marker = media / "pwned"
    torch.save({"mm_embeddings": CodeRunningPickle(str(marker))}, media / "evil.pt")
    srv = ImageServer().start()
    save_file({"mm_embeddings": emb2}, str(media / "emb2.safetensors"))
    srv.add("/emb2.safetensors", (media / "emb2.safetensors").read_bytes())
    image = make_image(3, 40, 56)
    cases = [  # (text, parts, offline images)
        ("Describe these embeddings.", [str(media / "emb.pt")], [emb_in]),
        ("Compare the picture and the embeddings.",
         [_data_url(image), srv.url("/emb2.safetensors")], [image, emb2]),
    ]
    try:
        client = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0,
                               timeout=120)
        model = client.models.list().data[0].id

        def ask(case):
            text, urls, _ = case
            parts = [{"type": "text", "text": text}] + [
                {"type": "image_url", "image_url": {"url": u}} for u in urls]
            r = client.chat.completions.create(model=model, max_tokens=MAX_TOKENS, temperature=0,
                                               messages=[{"role": "user", "content": parts}])
            return r.choices[0].message.content

        with ThreadPoolExecutor(len(cases)) as pool:
            got = list(pool.map(ask, cases))
        want = [o.text for o in llm.generate(
            [[{"role": "user", "content": [{"type": "text", "text": text}] +
               [{"type": "image", "image": im} for im in ims]}] for text, _, ims in cases],
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))]
        assert got == want
        with pytest.raises(openai.BadRequestError) as bad:
            ask(("Hi.", [f"file://{media}/evil.pt"], None))
        assert bad.value.status_code == 400 and "invalid_embeddings" in str(bad.value.body)
        assert not marker.exists()
        assert ask(cases[0]) == want[0]                      # served again (encode cache)
        encoders = [r for r, s in deployment.ranks().items()
                    if s["role"] == "encode"] if deployment.num_ranks > 1 else []
        if encoders:                 # E/P/D: the files were loaded by encode, not by prefill
            end = time.monotonic() + 10
            while sum(deployment.ranks()[r].get("num_loaded", 0) for r in encoders) < 2:
                assert time.monotonic() < end, deployment.ranks()
                time.sleep(0.3)
    finally:
        srv.stop()

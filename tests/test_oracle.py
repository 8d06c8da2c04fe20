"""The oracle: our engine's greedy tokens == HF `generate(do_sample=False)`, float32 CPU, on
the tiny checkpoints, for every case below (each request vs its own HF generate)."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from mmhpc.config import CacheConfig, Config, ModelConfig, SchedulerConfig
from mmhpc.engine.engine import LLMEngine
from mmhpc.engine.sequence import MMItem, SamplingParams

torch.set_num_threads(1)
N = 6                                                  # new tokens per request


class Oracle:
    """HF model + processor for one tiny checkpoint; builds matching engine inputs."""

    def __init__(self, family: str, **sizes):
        from transformers import AutoModelForImageTextToText, GenerationConfig
        from mmhpc.tools.tiny import hf_processor, tiny_checkpoint
        self.family = family
        self.path = tiny_checkpoint(family, **sizes)
        self.proc = hf_processor(self.path)
        self.hf = AutoModelForImageTextToText.from_pretrained(self.path, dtype=torch.float32).eval()
        self.image_token_id = self.hf.config.image_token_id
        self.gen = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
        eos = self.hf.generation_config.eos_token_id
        self.stub = SimpleNamespace(tokenizer=self.proc.tokenizer,
                                    eos_token_ids=eos if isinstance(eos, list) else [eos])

    def inputs(self, text: str, images: list[Image.Image]) -> dict:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = self.proc.apply_chat_template([{"role": "user", "content": content}],
                                               add_generation_prompt=True, tokenize=False)
        return dict(self.proc(text=[prompt], images=images or None, return_tensors="pt"))

    def expected(self, inputs: dict, n: int = N, **generate_kw) -> list[int]:
        with torch.no_grad():
            out = self.hf.generate(**inputs, generation_config=self.gen, max_new_tokens=n,
                                   **generate_kw)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    def request(self, inputs: dict) -> tuple[list[int], list[MMItem]]:
        """The same prompt as engine input: ids and one MMItem per placeholder run."""
        ids = inputs["input_ids"][0].tolist()
        runs, i = [], 0
        while i < len(ids):
            if ids[i] == self.image_token_id:
                j = i
                while j < len(ids) and ids[j] == self.image_token_id:
                    j += 1
                runs.append((i, j - i))
                i = j
            else:
                i += 1
        items, pv, start = [], inputs.get("pixel_values"), 0
        grids, image_sizes = inputs.get("image_grid_thw"), inputs.get("image_sizes")
        for k, (offset, n) in enumerate(runs):
            size = None
            if image_sizes is not None:                 # LLaVA-NeXT: [images, most tiles, ...]
                from mmhpc.models.llava_next import num_tiles
                size = tuple(int(x) for x in image_sizes[k])
                cfg = self.hf.config
                grid = None
                pixels = pv[k, :num_tiles(*size, cfg.image_grid_pinpoints,
                                          cfg.vision_config.image_size)]
            elif grids is None:
                pixels, grid = pv[k:k + 1], None
            else:
                grid = tuple(int(x) for x in grids[k])
                pixels = pv[start:start + grid[0] * grid[1] * grid[2]]
                start += pixels.shape[0]
            h = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()
            items.append(MMItem(h, offset, n, grid_thw=grid, pixel_values=pixels, image_size=size))
        return ids, items

    def engine(self, **cache) -> LLMEngine:
        cfg = Config(model=ModelConfig(path=str(self.path)),
                     cache=CacheConfig(block_size=4, **({"num_blocks": 256} | cache)),
                     scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64))
        return LLMEngine(cfg, processor=self.stub)


def run(engine: LLMEngine, requests: dict, arrivals: dict[int, list[str]] | None = None,
        params: SamplingParams | None = None) -> dict[str, list[int]]:
    """Feed requests (all at step 0, or per `arrivals`) and collect their tokens."""
    params = params or SamplingParams(max_tokens=N, ignore_eos=True)
    arrivals = arrivals or {0: list(requests)}
    got: dict[str, list[int]] = {rid: [] for rid in requests}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished_requests():
        for rid in arrivals.get(step, []):
            ids, items = requests[rid]
            engine.add_request(rid, ids, params, items)
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
        step += 1
    return got


def image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


_ORACLES: dict[str, Oracle] = {}


def _oracle(family: str, **sizes) -> Oracle:
    key = f"{family}{sorted(sizes.items())}"
    if key not in _ORACLES:
        _ORACLES[key] = Oracle(family, **sizes)
    return _ORACLES[key]


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe",
                                        "llava_next", "qwen2_5_vl"])
def oracle(request):
    return _oracle(request.param)


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def sampler_oracle(request):
    """The sampler's cases: model-independent; the tiny Qwen3-VL(-MoE)'s greedy tokens happen
    not to move under the repetition penalties, which the cases need to see them applied."""
    return _oracle(request.param)


CASES = {
    "text": ("tell me a story about the sea", []),
    "one_image": ("what is in the picture?", [(32, 32, 1)]),
    "two_images": ("compare these two", [(32, 32, 2), (48, 40, 3)]),
    "sizes": ("describe", [(112, 56, 4), (28, 84, 5), (70, 70, 6)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_oracle_single(oracle, case):
    text, sizes = CASES[case]
    inputs = oracle.inputs(text, [image(*s) for s in sizes])
    got = run(oracle.engine(), {"r": oracle.request(inputs)})
    assert got["r"] == oracle.expected(inputs)


# LLaVA-NeXT (Llama and Mistral LMs) and Qwen2.5-VL: text, one image, and two images of
# different sizes and aspects (different tile grids and unpadding; full and partial windows),
# each request alone, then all of them batched in one engine (the `oracle` fixture's cases run
# them too, with the default tiny sizes).
DENSE_VLM_FAMILIES = {"llava_next": ("llava_next", {}),
                      "llava_next_mistral": ("llava_next", {"mistral": 1}),
                      "qwen2_5_vl": ("qwen2_5_vl", {})}
DENSE_VLM_CASES = {
    "text": ("tell me a story about the sea", []),
    "one_image": ("what is in the picture?", [(70, 50, 1)]),
    "two_images": ("compare these two", [(112, 112, 2), (30, 84, 3)]),
}


@pytest.mark.parametrize("family", list(DENSE_VLM_FAMILIES))
def test_oracle_dense_vlm(family):
    name, sizes = DENSE_VLM_FAMILIES[family]
    oracle = _oracle(name, **sizes)
    requests, expected = {}, {}
    for case, (text, sizes) in DENSE_VLM_CASES.items():
        inputs = oracle.inputs(text, [image(*s) for s in sizes])
        requests[case], expected[case] = oracle.request(inputs), oracle.expected(inputs)
        assert run(oracle.engine(), {case: requests[case]})[case] == expected[case], case
    assert run(oracle.engine(), requests) == expected


def test_oracle_mixed_arrivals_with_preemption(oracle):
    texts = ["hello there", "a cat on a mat", "numbers one two three", "why is the sky blue"]
    requests, expected = {}, {}
    for i in range(16):
        sizes = [] if i % 3 == 0 else [(32 + 8 * (i % 4), 32 + 16 * (i % 2), 100 + i)]
        inputs = oracle.inputs(texts[i % 4] + " " * (i % 2), [image(*s) for s in sizes])
        requests[f"r{i}"] = oracle.request(inputs)
        expected[f"r{i}"] = oracle.expected(inputs)
    lens = sorted(len(ids) + N for ids, _ in requests.values())
    # room for three typical requests (LLaVA-NeXT's vary: anyres), and for the longest one
    blocks = max(3 * (lens[len(lens) // 2] // 4 + 1), lens[-1] // 4 + 2)
    engine = oracle.engine(num_blocks=blocks)
    arrivals = {2 * k: [f"r{i}" for i in range(4 * k, 4 * k + 4)] for k in range(4)}
    got = run(engine, requests, arrivals)
    assert engine.num_preemptions > 0
    assert got == expected
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_total_blocks"]


def test_oracle_prefix_cache_hit(oracle):
    inputs = oracle.inputs("the same prompt twice, please", [image(32, 32, 7)])
    engine = oracle.engine()
    first = run(engine, {"a": oracle.request(inputs)})["a"]
    ids, items = oracle.request(inputs)                 # fresh items: encoded again, same hash
    outs = []
    engine.add_request("b", ids, SamplingParams(max_tokens=N, ignore_eos=True), items)
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[0].num_cached_tokens >= 4
    assert [t for o in outs for t in o.new_token_ids] == first == oracle.expected(inputs)


def test_oracle_prefix_cache_hit_seeded_hashes(oracle):
    """Hashes made by `prompt_block_hashes` (as a preprocessing thread does) instead of the
    scheduler: the same hits, the same tokens; too many hashes for the prompt: ValueError."""
    inputs = oracle.inputs("the same prompt twice, please", [image(32, 32, 7)])
    engine = oracle.engine()
    params = SamplingParams(max_tokens=N, ignore_eos=True)
    for rid in ("a", "b"):
        ids, items = oracle.request(inputs)
        engine.add_request(rid, ids, params, items,
                           block_hashes=engine.prompt_block_hashes(ids, items))
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        assert [t for o in outs for t in o.new_token_ids] == oracle.expected(inputs)
    assert outs[0].num_cached_tokens >= 4
    ids, items = oracle.request(inputs)
    with pytest.raises(ValueError, match="block hashes"):
        engine.add_request("c", ids, params, items, block_hashes=[0] * (len(ids) // 4 + 1))


def test_oracle_prefill_decode_handoff(oracle):
    """Prefill-only engine → KV blocks copied → decode engine: same tokens as HF."""
    inputs = oracle.inputs("hand me off", [image(40, 32, 9)])
    ids, items = oracle.request(inputs)
    params = SamplingParams(max_tokens=N, ignore_eos=True)
    prefill, decode = oracle.engine(), oracle.engine(num_blocks=64)
    prefill.add_request("p", ids, params, items, prefill_only=True)
    outs = []
    while prefill.has_unfinished_requests():
        outs += prefill.step()
    assert len(outs) == 1 and not outs[0].finished
    first = outs[0].new_token_ids[0]
    src = prefill.retained_block_ids("p")
    for it in items:                                    # decode needs offsets and grids only
        it.pixel_values = it.embeddings = None
    dst = decode.add_prefilled_request("p", ids, params, first, items)
    assert len(dst) == len(src)
    decode.kv_cache[:, :, dst] = prefill.kv_cache[:, :, src]
    assert prefill.release_request("p")
    decode.activate_request("p")
    toks = [first]
    while decode.has_unfinished_requests():
        toks += [t for o in decode.step() for t in o.new_token_ids]
    assert toks == oracle.expected(inputs)
    assert prefill.stats()["num_free_blocks"] == prefill.stats()["num_total_blocks"]


# (SamplingParams fields, HF generate's): penalties and bias, each against HF's own processor
PENALTY_CASES = {
    "repetition": ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
    "repetition_below_1": ({"repetition_penalty": 0.5}, {"repetition_penalty": 0.5}),
    "logit_bias": ({"logit_bias": {7: 4.0, 9: 3.5, 11: -50.0}},
                   {"sequence_bias": {(7,): 4.0, (9,): 3.5, (11,): -50.0}}),
}


@pytest.mark.parametrize("case", list(PENALTY_CASES))
def test_oracle_penalties(sampler_oracle, case):
    """A penalized request batched beside a plain one: each equals its own HF generate, and
    the penalty changes the tokens (so the test sees it applied)."""
    ours, hf_kw = PENALTY_CASES[case]
    n = 12
    inputs = sampler_oracle.inputs("say it again and again", [image(32, 32, 11)])
    plain = sampler_oracle.expected(inputs, n)
    want = sampler_oracle.expected(inputs, n, **hf_kw)
    assert want != plain
    engine = sampler_oracle.engine()
    for rid, extra in (("plain", {}), ("penalized", ours)):
        ids, items = sampler_oracle.request(inputs)
        engine.add_request(rid, ids, SamplingParams(max_tokens=n, ignore_eos=True, **extra), items)
    got: dict[str, list[int]] = {"plain": [], "penalized": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert got == {"plain": plain, "penalized": want}

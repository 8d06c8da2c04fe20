"""Llama-4 (tiny Maverick-like and Scout-like checkpoints): our engine's greedy tokens == HF
`generate` (float32), in process: text, images (tiles + global view), prompts crossing
several 16-token attention chunks (chunked prefill, decode across a chunk boundary), prefix
reuse ending mid-chunk; the tiling; refusals of unimplemented MoE variants."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmhpc.config import CacheConfig, Config, ModelConfig, SchedulerConfig
from mmhpc.engine.engine import LLMEngine
from mmhpc.engine.sequence import SamplingParams

torch.set_num_threads(1)
N = 6
CHUNK = 16


def image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


LONG = "the quick brown fox jumps over the lazy dog and runs far away " * 4

# name: (text, image sizes (w, h, seed)); the long prompt spans more than three chunks
CASES = {
    "text": ("tell me a story about the sea", []),
    "one_image": ("what is in the picture?", [(48, 32, 1)]),
    "two_images": ("compare these two", [(32, 32, 2), (70, 40, 3)]),
    "long": (LONG, []),
}


def hf_llama4_generate_fix() -> None:
    """transformers 5.24's Llama4ForConditionalGeneration.forward reads `image_outputs` off its
    language model's MoeCausalLMOutputWithPast, which has no such field (AttributeError in
    every generate): the field reads as None, as it would on an output that has it."""
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast
    if "image_outputs" not in MoeCausalLMOutputWithPast.__dataclass_fields__:
        MoeCausalLMOutputWithPast.image_outputs = None


VARIANTS = {"llama4": {}, "llama4_scout": {"moe_step": 1}}   # Maverick-like, Scout-like


class Llama4Oracle:
    def __init__(self, variant: str):
        hf_llama4_generate_fix()
        from transformers import GenerationConfig, Llama4ForConditionalGeneration

        from mmhpc.multimodal.processor import InputProcessor
        from mmhpc.tools.tiny import tiny_checkpoint
        self.path = tiny_checkpoint("llama4", **VARIANTS[variant])
        self.proc = InputProcessor(self.path)
        self.hf = Llama4ForConditionalGeneration.from_pretrained(self.path, dtype=torch.float32).eval()
        self.gen = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)

    def request(self, text: str, sizes) -> tuple[list[int], list]:
        content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": text}]
        prompt = self.proc.apply_chat_template([{"role": "user", "content": content}])
        return self.proc.process(prompt, [image(*s) for s in sizes])

    def expected(self, ids: list[int], items, n: int = N) -> list[int]:
        kw = {}
        if items:
            kw["pixel_values"] = torch.cat([it.pixel_values for it in items])
        with torch.no_grad():
            out = self.hf.generate(input_ids=torch.tensor([ids]), generation_config=self.gen,
                                   max_new_tokens=n, **kw)
        return out[0, len(ids):].tolist()

    def engine(self, **cache) -> LLMEngine:
        cfg = Config(model=ModelConfig(path=str(self.path)),
                     cache=CacheConfig(block_size=4, **({"num_blocks": 256} | cache)),
                     scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=24))
        return LLMEngine(cfg, processor=self.proc)


def run(engine: LLMEngine, requests: dict, n: int = N) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    got: dict[str, list[int]] = {rid: [] for rid in requests}
    for rid, (ids, items) in requests.items():
        engine.add_request(rid, ids, params, items)
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    return got


@pytest.fixture(scope="module", params=list(VARIANTS))
def oracle(request):
    return Llama4Oracle(request.param)


@pytest.mark.parametrize("case", list(CASES))
def test_llama4_oracle(oracle, case):
    ids, items = oracle.request(*CASES[case])
    if case == "long":
        assert len(ids) > 3 * CHUNK
    expected = oracle.expected(ids, items)
    assert run(oracle.engine(), {"r": (ids, items)})["r"] == expected


def test_llama4_batched_and_decode_across_chunks(oracle):
    """Several sequences in one step (batched decode), one decoding 20 tokens past its
    prompt so its decode steps cross a chunk boundary."""
    reqs = {k: oracle.request(*CASES[k]) for k in ("text", "one_image", "long")}
    engine = oracle.engine()
    got = run(engine, reqs, n=20)
    for rid, (ids, items) in reqs.items():
        assert got[rid] == oracle.expected(ids, items, n=20), rid


def test_llama4_prefix_reuse_mid_chunk(oracle):
    """A repeated prompt: the cached prefix (whole 4-token blocks) ends inside a chunk."""
    ids, items = next(r for r in (oracle.request(LONG[:n], []) for n in range(90, 200, 3))
                      if ((len(r[0]) - 1) // 4 * 4) % CHUNK)
    engine = oracle.engine()
    first = run(engine, {"a": (ids, items)})["a"]
    outs = []
    engine.add_request("b", ids, SamplingParams(max_tokens=N, ignore_eos=True), [])
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[0].num_cached_tokens >= CHUNK
    assert [t for o in outs for t in o.new_token_ids] == first == oracle.expected(ids, items)


def test_tiles_span_matches_hf_processor_layout():
    """The tiled span of a 2 x 3 grid, as HF's Llama4Processor writes it."""
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    from mmhpc.multimodal import tiles
    ids = {t: i for i, t in enumerate(tiles.SPECIAL)}
    text = Llama4Processor._prompt_split_image(None, (2, 3), 2)
    names = text.replace("|><|", "|>\n<|").split("\n")
    assert [ids[n] for n in names] == tiles.span_ids(2, 3, 2, ids)
    assert tiles.span_length(2, 3, 2) == len(names)
    assert tiles.span_length(1, 1, 4) == len(tiles.span_ids(1, 1, 4, ids))


def test_unimplemented_moe_variant_refused(tmp_path):
    from mmhpc.models import load_model
    from mmhpc.tools.tiny import tiny_checkpoint
    src = tiny_checkpoint("llama4")
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["scoring_func"] = "softmax"
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="text_config.scoring_func='softmax'"):
        load_model(tmp_path)


def test_gpu_bench_smoke(capsys):
    """bench/llama4_gpu.py on CPU: ours == HF logits (it asserts), timings and floors printed."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "llama4_gpu.py"
    spec = importlib.util.spec_from_file_location("llama4_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--layers", "4", "--batches", "1,4"])
    out = json.loads(capsys.readouterr().out)
    assert out["check"]["same_argmax"] and out["check"]["max_rel_err"] < 1e-4
    assert out["batch_1"]["ours_ms"] > 0 and out["batch_4"]["floor_ms"] > out["batch_1"]["floor_ms"]


def _hf_tiling_functions() -> dict:
    """HF's own canvas functions (image_processing_llama4.py), compiled from its source: the
    module imports torchvision at the top, which this environment lacks."""
    import ast
    import math
    from collections import defaultdict
    from functools import lru_cache
    from pathlib import Path

    import transformers
    src = (Path(transformers.__file__).parent / "models/llama4/image_processing_llama4.py").read_text()
    names = {"get_factors", "get_max_res_without_distortion", "find_supported_resolutions",
             "get_best_fit"}
    tree = ast.parse(src)
    tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    ns = {"torch": torch, "math": math, "defaultdict": defaultdict, "lru_cache": lru_cache,
          "SizeDict": object}
    exec(compile(tree, "image_processing_llama4", "exec"), ns)
    return ns


@pytest.mark.parametrize("max_tiles", [4, 16])
def test_tiles_canvas_matches_hf(max_tiles):
    """The tile grid and the resized size, as HF's Llama4ImageProcessor picks them."""
    from collections import namedtuple

    from mmhpc.multimodal import tiles
    hf = _hf_tiling_functions()
    size = namedtuple("Size", "height width")(32, 32)
    res = torch.tensor(hf["find_supported_resolutions"](max_tiles, size))
    assert [tuple(r) for r in res.tolist()] == list(tiles.supported_resolutions(max_tiles, 32))
    cfg = tiles.TileConfig(32, max_tiles, 4)
    for h in (5, 17, 32, 33, 40, 64, 90, 200):
        for w in (7, 20, 32, 48, 70, 128, 333):
            canvas = tuple(int(x) for x in hf["get_best_fit"]((h, w), res))
            assert tiles.best_canvas(h, w, cfg) == canvas, (h, w)
            th, tw = min(max(h, 32), canvas[0]), min(max(w, 32), canvas[1])
            want = hf["get_max_res_without_distortion"]((h, w), (th, tw))
            assert tiles._resized_size(h, w, canvas, 32) == tuple(max(1, x) for x in want), (h, w)

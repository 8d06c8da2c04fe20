"""The whole engine on CUDA (tiny checkpoints, float32): the fast path (Triton kernels, decode
graphs, the batch-1 GEMV, decode ahead) gives the same greedy tokens as the plain-torch path,
with requests of different images, prompt and output lengths, and fewer seats than requests
(admissions and finishes mid-run, so predictions are both taken and dropped).
Marked `gpu`: run on the GPU machine (`python3 bench/run_gpu_tests.py --file
tests/test_engine_gpu.py`); skipped without CUDA."""
from __future__ import annotations

import os

import pytest
import torch

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _run(family: str, env: dict) -> tuple[list[int], tuple | None]:
    from mmhpc.bench.offline import ImageItems, _StubProcessor, build_prompt
    from mmhpc.bench.synthetic import make_requests
    from mmhpc.config import Config
    from mmhpc.engine.engine import LLMEngine
    from mmhpc.engine.sequence import SamplingParams
    from mmhpc.models import load_hf_config
    from mmhpc.tools.tiny import tiny_checkpoint
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        path = tiny_checkpoint(family)
        cfg = Config.from_dict({"model": {"path": str(path), "dtype": "float32",
                                          "max_model_len": 512},
                                "cache": {"num_blocks": 256}, "scheduler": {"max_num_seqs": 4}})
        eng = LLMEngine(cfg, processor=_StubProcessor([2]))
        items = ImageItems(path, load_hf_config(path))
        reqs = make_requests(6, [(40, 56), (64, 48)], 1, 7, 12, (16, 600), 1,
                             (items.image_token_id,))
        for i, r in enumerate(reqs):
            its = [items(im) for im in r.images]
            eng.add_request(r.request_id, build_prompt(its, r.text_ids, items.image_token_id),
                            SamplingParams(max_tokens=20 + 7 * i, ignore_eos=True), mm_items=its)
        out: dict[str, list[int]] = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        cs = eng.runner.cuda_steps
        stats = (cs.ahead_hits, cs.ahead_misses) if cs is not None else None
        return [t for r in reqs for t in out[r.request_id]], stats
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@gpu
@needs_gpu
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_fast_path_equals_plain_torch(family):
    plain, _ = _run(family, {"MMHPC_FAST_PATH": "0"})
    no_ahead, _ = _run(family, {"MMHPC_FAST_PATH": "1", "MMHPC_DECODE_AHEAD": "0"})
    ahead, (hits, misses) = _run(family, {"MMHPC_FAST_PATH": "1", "MMHPC_DECODE_AHEAD": "1"})
    cublas, _ = _run(family, {"MMHPC_FAST_PATH": "1", "MMHPC_GEMV": "0"})
    assert len(plain) == sum(20 + 7 * i for i in range(6))
    assert no_ahead == plain and ahead == plain and cublas == plain
    assert hits > 10 and misses > 0          # predictions both used and dropped

"""The whole engine on CUDA (tiny checkpoints, float32): the fast path (Triton kernels, decode
graphs, the batch-1 GEMV, decode ahead) gives the same greedy tokens as the plain-torch path,
with requests of different images, prompt and output lengths, and fewer seats than requests
(admissions and finishes mid-run, so predictions are both taken and dropped).
Marked `gpu`: run on the GPU machine (`python3 bench/run_gpu_tests.py --file
tests/test_engine_gpu.py`); skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_gpu
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_fast_path_equals_plain_torch(family):
    from mmhpc.bench.offline import tiny_engine_tokens as run
    plain, _ = run(family, {"MMHPC_FAST_PATH": "0"})
    no_ahead, _ = run(family, {"MMHPC_FAST_PATH": "1", "MMHPC_DECODE_AHEAD": "0"})
    ahead, (hits, misses) = run(family, {"MMHPC_FAST_PATH": "1", "MMHPC_DECODE_AHEAD": "1"})
    cublas, _ = run(family, {"MMHPC_FAST_PATH": "1", "MMHPC_GEMV": "0"})
    assert len(plain) == sum(20 + 7 * i for i in range(6))
    assert no_ahead == plain and ahead == plain and cublas == plain
    assert hits > 10 and misses > 0          # predictions both used and dropped


@gpu
@needs_gpu
def test_prefill_flash_tail_bf16():
    """bf16 on CUDA: a mixed prefill step with the new prompts on FlashAttention varlen (and
    the last layer pruned) matches the Triton paged kernel alone within bf16 tolerance."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from mmhpc import kernels
    from test_fast_decoder import check_split_fresh_tail
    calls = check_split_fresh_tail("cuda", torch.bfloat16, tol=5e-2)
    assert kernels._flash_error is None and calls and set(calls) == {9}

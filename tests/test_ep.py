"""Expert parallelism and Llama-4 over HTTP under `mpirun`: greedy tokens == HF generate
(float32) for text, one image, two images, a prompt longer than three attention chunks and a
repeated prompt (prefix reuse), in the deployments listed below as data; tokens per expert
on /metrics; one-line refusals of bad ep sizes."""
from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest

from mmhpc.config import DeploymentConfig, GroupConfig
from mmhpc.launch.layout import LayoutError, make_layout
from tests.test_llama4 import LONG, VARIANTS, Llama4Oracle
from tests.test_tp import MPIRUN, Deployment, _image, chat_tokens

N = 6
CASES = [("tell me a story about the sea", []), ("what is in the picture?", [(48, 32, 1)]),
         ("compare these two", [(32, 32, 2), (70, 40, 3)]), (LONG, [])]

# (id, variant (test_llama4.VARIANTS), ranks, overrides[, "slow"]): the slow tier has the
# disaggregated ones
DEPLOYMENTS = [
    ("agg_tp1", "llama4", 1, [], "slow"),
    ("agg_tp2_ep2", "llama4", 2, ["deployment.aggregated.tp=2", "deployment.aggregated.ep=2"]),
    ("agg_tp2_ep2-scout", "llama4_scout", 2,
     ["deployment.aggregated.tp=2", "deployment.aggregated.ep=2"], "slow"),
    ("ep_d-p_tp2_ep2-d_tp1", "llama4", 4,
     ["deployment=ep_d", "deployment.prefill.tp=2", "deployment.prefill.ep=2"], "slow"),
    ("e_p_d-p_tp2_ep2-d_tp1", "llama4", 5,
     ["deployment=e_p_d", "deployment.prefill.tp=2", "deployment.prefill.ep=2"], "slow"),
    ("e_p_d-p_tp1-d_tp2_ep2", "llama4_scout", 5,
     ["deployment=e_p_d", "deployment.decode.tp=2", "deployment.decode.ep=2"], "slow"),
]
PARAMS = [pytest.param(d, id=d[0], marks=[pytest.mark.slow] if d[4:] == ("slow",) else [])
          for d in DEPLOYMENTS]


_ORACLES: dict[str, Llama4Oracle] = {}


def expected(variant: str, text: str, sizes) -> list[str]:
    o = _ORACLES.setdefault(variant, Llama4Oracle(variant))
    ids, items = o.request(text, sizes)
    return [o.proc.tokenizer.decode([t]) for t in o.expected(ids, items)]


@pytest.fixture(scope="module", params=PARAMS)
def deployment(request):
    from mmhpc.tools.tiny import tiny_checkpoint
    name, variant, ranks, overrides, *_ = request.param
    path = tiny_checkpoint("llama4", **VARIANTS[variant])
    dep = Deployment(ranks, [f"model.path={path}", "model.max_model_len=512",
                             "cache.num_blocks=128", "cache.block_size=4", *overrides])
    yield dep, path, variant
    rc = dep.stop()
    assert rc == 0 or (name.startswith("e") and rc in (15, 143, -15)), "".join(dep.lines[-40:])


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_llama4_oracle_over_http(deployment):
    dep, path, variant = deployment
    results: dict[int, list[str]] = {}

    def one(i: int) -> None:
        text, sizes = CASES[i]
        results[i] = chat_tokens(dep.url, path.name, text, [_image(*s) for s in sizes])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(CASES))]
    for t in threads:                 # concurrent: batched steps, tokens split over ep groups
        t.start()
    want = {i: expected(variant, text, sizes) for i, (text, sizes) in enumerate(CASES)}
    for t in threads:
        t.join(300)
    assert results == want
    # the same prompt again: served from the prefix cache, the same tokens
    text, sizes = CASES[3]
    assert chat_tokens(dep.url, path.name, text, []) == want[3]
    # A remote rank's counts reach rank 0 with its heartbeats (every timeouts.heartbeat_s, 2 s):
    # scrape until they are in, for a few beats.
    deadline = time.monotonic() + 15
    while True:
        with urllib.request.urlopen(dep.url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        counts = [int(n) for n in re.findall(
            r'^mmhpc_expert_tokens_total\{.*expert="\d+"\} (\d+)$', metrics, re.M)]
        if (len(counts) >= 4 and sum(counts) > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(counts) >= 4 and sum(counts) > 0, metrics[-2000:]


def test_ep_sizes_checked_at_start():
    moe = dict(num_heads=4, num_kv_heads=2, num_experts=4)
    ok = make_layout(2, 2, DeploymentConfig(aggregated=GroupConfig(1, 2, 2)), **moe)
    assert [r.ep for r in ok] == [2, 2]
    for group, kw, match in [
        (GroupConfig(1, 2, 4), moe, "ep=4 does not divide deployment.aggregated.tp=2"),
        (GroupConfig(1, 4, 4), dict(moe, num_experts=6), r"does not divide the model's 6 experts: use ep in \[1, 2\]"),
        (GroupConfig(1, 2, 2), dict(moe, num_experts=0), "needs a mixture-of-experts model"),
    ]:
        with pytest.raises(LayoutError, match=match):
            make_layout(group.tp, group.tp, DeploymentConfig(aggregated=group), **kw)

"""Per-stage Prometheus metrics: every rank's series served by rank 0 with vLLM's names where
it has one, labelled by role, instance and rank; after a run under real `mpirun` (E/P/D,
tiny LLaVA) they add up: one prefill per request, embedding bytes = rows x row bytes, KV
blocks READ by decode = blocks prefill offered, KV bytes = blocks x the block's bytes (from
the checkpoint's config), encoder-cache queries = hits + encodes, one TTFT / e2e / success
per request."""
from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import make_image
from mpi_helpers import running
from test_epd import _data_url


def parse(text: str) -> dict[str, dict[tuple, float]]:
    """{name: {((label, value), ...): value}} from Prometheus text."""
    out: dict[str, dict[tuple, float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([^{\s]+)(?:\{(.*)\})? (\S+)", line)
        assert m, line
        labels = tuple(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out.setdefault(m.group(1), {})[labels] = float(m.group(3))
    return out


def total(metrics: dict, name: str, role: str | None = None) -> float:
    return sum(v for labels, v in metrics.get(name, {}).items()
               if role is None or ("role", role) in labels)


def test_rank_series_are_labelled_by_role_instance_rank():
    from mmhpc.server.metrics import Metrics
    text = Metrics().render({"ranks": {
        1: {"role": "encode", "instance": 0, "num_encoded": 3, "num_cache_hits": 1},
        2: {"role": "prefill", "instance": 0, "num_prefills": 5, "num_free_blocks": 6,
            "num_total_blocks": 8},
        3: {"role": "decode", "instance": 1, "num_kv_blocks": 7, "num_preemptions": 2}}}, True)
    m = parse(text)
    assert m["mmhpc:encoder_items_total"] == {(("role", "encode"), ("instance", "0"),
                                               ("rank", "1")): 3}
    assert total(m, "vllm:mm_cache_hits_total", "encode") == 1
    assert total(m, "mmhpc:prefills_total", "prefill") == 5
    assert total(m, "vllm:kv_cache_usage_perc", "prefill") == 0.25
    assert m["vllm:num_preemptions_total"] == {(("role", "decode"), ("instance", "1"),
                                                 ("rank", "3")): 2}
    assert "# TYPE mmhpc:kv_transfer_blocks_total counter" in text


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    with running(4, ["model=tiny_llava", "deployment=e_p_d", "timeouts.heartbeat_s=0.3"],
                 tmp_path_factory, "metrics") as d:
        yield d


@pytest.mark.slow
def test_metrics_add_up_after_a_run(dep):
    import urllib.request

    from openai import OpenAI
    client = OpenAI(base_url=dep.url + "/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    num_requests, images = 12, [make_image(k % 3, 40, 40) for k in range(12)]   # 3 distinct

    def one(k: int) -> None:
        parts = [{"type": "text", "text": f"Request {k}."}]
        if k % 2 == 0:
            parts.append({"type": "image_url", "image_url": {"url": _data_url(images[k])}})
        client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": parts}],
                                       extra_body={"ignore_eos": True})
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(one, range(num_requests)))

    def scrape() -> dict:
        with urllib.request.urlopen(dep.url + "/metrics", timeout=10) as r:
            return parse(r.read().decode())
    end = time.monotonic() + 15
    while True:                                  # rank stats ride heartbeats: let them land
        m = scrape()
        if total(m, "mmhpc:prefills_total") == num_requests and \
                total(m, "mmhpc:kv_transfers_total") == num_requests:
            break
        assert time.monotonic() < end, json.dumps({k: v for k, v in m.items()
                                                   if k.startswith("mmhpc:")}, default=str)
        time.sleep(0.3)
    num_items = num_requests // 2
    from mmhpc.tools.tiny import tiny_checkpoint
    text = json.load(open(tiny_checkpoint("llava") / "config.json"))["text_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    block_bytes = text["num_hidden_layers"] * 2 * 16 * text["num_key_value_heads"] * head_dim * 4
    # prefill: one per request; its offers are what decode READ, bytes = blocks x block bytes
    assert total(m, "mmhpc:prefills_total", "prefill") == num_requests
    blocks = total(m, "mmhpc:kv_transfer_blocks_total", "decode")
    assert blocks == total(m, "mmhpc:kv_blocks_handed_total", "prefill") > 0
    assert total(m, "mmhpc:kv_block_bytes", "decode") == block_bytes
    assert total(m, "mmhpc:kv_transfer_bytes_total", "decode") == blocks * block_bytes
    assert total(m, "mmhpc:kv_transfer_seconds_total", "decode") > 0
    # encode -> prefill: every image item READ once, rows x row bytes
    rows = 16 * num_items                        # tiny LLaVA: 16 tokens an image
    assert total(m, "mmhpc:embedding_transfers_total", "prefill") == num_items
    assert total(m, "mmhpc:embedding_transfer_bytes_total", "prefill") == \
        rows * text["hidden_size"] * 4
    assert total(m, "mmhpc:embedding_rows_sent_total", "encode") == rows
    queries = total(m, "vllm:mm_cache_queries_total", "encode")
    assert queries == num_items
    assert total(m, "vllm:mm_cache_hits_total", "encode") + \
        total(m, "mmhpc:encoder_items_total", "encode") == queries
    assert total(m, "mmhpc:encoder_items_total", "encode") == 3          # distinct images
    assert total(m, "mmhpc:encoder_seconds_total", "encode") > 0
    # prefix cache: queried tokens = every prompt token
    assert total(m, "vllm:prefix_cache_queries_total", "prefill") >= num_requests
    # frontend: one TTFT, e2e latency and success per request; 7 gaps between 8 tokens
    assert total(m, "vllm:request_success_total") == num_requests
    assert total(m, "vllm:time_to_first_token_seconds_count") == num_requests
    assert total(m, "vllm:e2e_request_latency_seconds_count") == num_requests
    assert total(m, "vllm:time_per_output_token_seconds_count") == num_requests
    assert total(m, "vllm:inter_token_latency_seconds_count") > 0
    # pools back to full, every role and instance labelled
    assert total(m, "mmhpc:kv_blocks_free", "decode") + total(m, "mmhpc:kv_blocks_cached",
                                                              "decode") >= \
        total(m, "mmhpc:kv_blocks_total", "decode")
    roles = {dict(labels)["role"] for labels in m["vllm:num_requests_waiting"]}
    assert roles == {"encode", "prefill", "decode"}
    assert "vllm:num_preemptions_total" in m and "mmhpc:aborts_total" in m

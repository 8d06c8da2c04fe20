"""Prometheus text exposition (format 0.0.4) without a client library: counters, gauges and
histograms the frontend updates on its event loop, plus engine gauges read at scrape time.

Two families of names:
- `mmhpc_*`: the frontend's own (requests by endpoint and status, tokens, latency);
- `vllm:*` where vLLM has the metric (TTFT, inter-token latency, time per output token,
  end-to-end latency, running / waiting, preemptions, prefix- and encoder-cache queries and
  hits, KV usage) and `mmhpc:*` for the stages vLLM has no name for (encode, embedding and KV
  transfers, pools, aborts by stage). Every rank's series come from its Heartbeat stats
  (`RANK_SERIES`: stats key -> name, type), labelled by role, instance and rank; rank 0
  serves them all. Per-rank times are `_seconds_total` counters beside a matching count
  (sum / count = the mean): a rank reports plain numbers, not buckets."""
from __future__ import annotations

import bisect
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


class Histogram:
    def __init__(self, buckets: tuple = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for le, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        acc += self.counts[-1]
        out += [f'{name}_bucket{{le="+Inf"}} {acc}', f"{name}_sum {self.sum:.6f}",
                f"{name}_count {acc}"]
        return out


# (stats key, metric name, type, help): one series per rank that reports the key.
RANK_SERIES = [
    ("num_running", "vllm:num_requests_running", "gauge", "requests in the engine's batch"),
    ("num_waiting", "vllm:num_requests_waiting", "gauge", "requests queued at the stage"),
    ("num_preemptions", "vllm:num_preemptions_total", "counter", "preemptions"),
    ("num_prefill_tokens", "vllm:prefix_cache_queries_total", "counter",
     "prompt tokens looked up in the prefix cache"),
    ("num_cached_tokens", "vllm:prefix_cache_hits_total", "counter",
     "prompt tokens found in the prefix cache"),
    ("num_cache_queries", "vllm:mm_cache_queries_total", "counter", "encoder-cache lookups"),
    ("num_cache_hits", "vllm:mm_cache_hits_total", "counter", "encoder-cache hits"),
    ("num_free_blocks", "mmhpc:kv_blocks_free", "gauge", "free KV blocks"),
    ("num_total_blocks", "mmhpc:kv_blocks_total", "gauge", "KV blocks in the pool"),
    ("num_cached_blocks", "mmhpc:kv_blocks_cached", "gauge", "free KV blocks holding a prefix"),
    ("num_retained", "mmhpc:kv_retained_requests", "gauge", "prefills waiting for decode's pull"),
    ("num_free_rows", "mmhpc:embedding_rows_free", "gauge", "free embedding pool rows"),
    ("num_pinned_items", "mmhpc:embedding_items_pinned", "gauge",
     "cached embeddings held for a request"),
    ("num_total_rows", "mmhpc:embedding_rows_total", "gauge", "embedding pool rows"),
    ("queue_s", "mmhpc:queue_seconds_total", "counter", "time requests waited at the stage"),
    ("num_batches", "mmhpc:encoder_batches_total", "counter", "vision encoder batches"),
    ("num_encoded", "mmhpc:encoder_items_total", "counter", "images encoded"),
    ("encode_s", "mmhpc:encoder_seconds_total", "counter", "vision encoder time"),
    ("num_pool_waits", "mmhpc:embedding_pool_waits_total", "counter",
     "requests that waited for embedding pool rows"),
    ("num_published_rows", "mmhpc:embedding_rows_sent_total", "counter",
     "embedding rows offered to prefill"),
    ("num_embedding_reads", "mmhpc:embedding_transfers_total", "counter",
     "embedding READs (encode -> prefill)"),
    ("num_embedding_bytes", "mmhpc:embedding_transfer_bytes_total", "counter",
     "embedding bytes READ (encode -> prefill)"),
    ("embedding_read_s", "mmhpc:embedding_transfer_seconds_total", "counter",
     "embedding READ time"),
    ("num_prefills", "mmhpc:prefills_total", "counter", "prompts prefilled (first token sent)"),
    ("prefill_s", "mmhpc:prefill_seconds_total", "counter", "prefill engine step time"),
    ("num_handed_blocks", "mmhpc:kv_blocks_handed_total", "counter",
     "KV blocks offered to decode"),
    ("num_kv_pulls", "mmhpc:kv_transfers_total", "counter", "KV READs (prefill -> decode)"),
    ("num_kv_blocks", "mmhpc:kv_transfer_blocks_total", "counter", "KV blocks READ"),
    ("num_kv_bytes", "mmhpc:kv_transfer_bytes_total", "counter", "KV bytes READ"),
    ("kv_pull_s", "mmhpc:kv_transfer_seconds_total", "counter", "KV READ time"),
    ("kv_block_bytes", "mmhpc:kv_block_bytes", "gauge", "bytes of one KV block, all layers"),
    ("step_s", "mmhpc:engine_step_seconds_total", "counter", "engine step time"),
    ("num_steps", "mmhpc:engine_steps_total", "counter", "engine steps"),
    ("num_step_errors", "mmhpc:engine_step_errors_total", "counter", "engine steps that raised"),
    ("num_aborted", "mmhpc:aborts_total", "counter", "requests aborted at the stage"),
    ("loop_stalled_s", "mmhpc:engine_loop_stalled_seconds", "gauge",
     "time since the engine loop last turned"),
]


def rank_lines(ranks: dict) -> list[str]:
    """Per-rank series from {rank: stats (with "role", "instance")}."""
    out = []
    for key, name, kind, help_ in RANK_SERIES:
        rows = [(r, s) for r, s in sorted(ranks.items()) if isinstance(s.get(key), (int, float))]
        if not rows:
            continue
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        out += [f"{name}{_rank_labels(r, s)} {s[key]}" for r, s in rows]
    usage = [(r, s) for r, s in sorted(ranks.items()) if s.get("num_total_blocks")]
    if usage:
        out.append("# TYPE vllm:kv_cache_usage_perc gauge")
        out += [f"vllm:kv_cache_usage_perc{_rank_labels(r, s)} "
                f"{1 - s.get('num_free_blocks', 0) / s['num_total_blocks']:.6f}" for r, s in usage]
    return out


def _rank_labels(rank: int, s: dict) -> str:
    return _labels((("role", s.get("role", "?")), ("instance", s.get("instance", 0)),
                    ("rank", rank)))


class Metrics:
    PREFIX = "mmhpc_"

    def __init__(self) -> None:
        self.requests: dict[tuple, int] = defaultdict(int)   # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_tokens = 0
        self.aborted = 0
        self.in_flight = 0
        self.latency = Histogram()        # whole request, seconds
        self.ttft = Histogram()           # time to first token
        self.media = Histogram()          # media fetch + decode + processor
        self.itl = Histogram()            # between two outputs of one request
        self.tpot = Histogram()           # a request's (end - first token) / (tokens - 1)
        self.num_success = 0

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(("endpoint", endpoint), ("status", str(status)))] += 1
        self.latency.observe(seconds)

    def request_finished(self, ttft: float, seconds: float, num_tokens: int) -> None:
        self.num_success += 1
        if num_tokens > 1:
            self.tpot.observe((seconds - ttft) / (num_tokens - 1))

    def render(self, engine_stats: dict, healthy: bool) -> str:
        p = self.PREFIX
        out = [f"# TYPE {p}requests_total counter"]
        out += [f"{p}requests_total{_labels(k)} {v}" for k, v in sorted(self.requests.items())]
        for name, v in (("prompt_tokens_total", self.prompt_tokens),
                        ("generation_tokens_total", self.generation_tokens),
                        ("prompt_cached_tokens_total", self.cached_tokens),
                        ("requests_aborted_total", self.aborted)):
            out += [f"# TYPE {p}{name} counter", f"{p}{name} {v}"]
        gauges = {"requests_in_flight": self.in_flight, "healthy": int(healthy)}
        for k in ("num_running", "num_waiting", "num_free_blocks", "num_total_blocks",
                  "num_frontend_requests", "num_frontend_stalls", "frontend_stall_max_s"):
            if isinstance(engine_stats.get(k), (int, float)):
                gauges[k] = engine_stats[k]
        if "num_running" in gauges and "num_waiting" in gauges:
            gauges["queue_depth"] = gauges["num_waiting"]
        for name, v in gauges.items():
            out += [f"# TYPE {p}{name} gauge", f"{p}{name} {v}"]
        out += _expert_lines(p, engine_stats)
        for name, h in (("request_latency_seconds", self.latency),
                        ("time_to_first_token_seconds", self.ttft),
                        ("media_seconds", self.media)):
            out += [f"# TYPE {p}{name} histogram"] + h.lines(p + name)
        for name, h in (("vllm:time_to_first_token_seconds", self.ttft),
                        ("vllm:inter_token_latency_seconds", self.itl),
                        ("vllm:time_per_output_token_seconds", self.tpot),
                        ("vllm:e2e_request_latency_seconds", self.latency)):
            out += [f"# TYPE {name} histogram"] + h.lines(name)
        out += ["# TYPE vllm:request_success_total counter",
                f"vllm:request_success_total {self.num_success}"]
        out += rank_lines(engine_stats.get("ranks", {}))
        return "\n".join(out) + "\n"


def _expert_lines(p: str, engine_stats: dict) -> list[str]:
    """Tokens routed to each expert (summed over MoE layers) per instance that reports them:
    the local engine's (aggregated) and every rank's in `ranks` (instance leaders report)."""
    sources = []
    if isinstance(engine_stats.get("tokens_per_expert"), list):
        sources.append(((("role", "aggregated"), ("rank", "0")), engine_stats["tokens_per_expert"]))
    for rank, s in sorted((engine_stats.get("ranks") or {}).items()):
        if isinstance(s, dict) and isinstance(s.get("tokens_per_expert"), list):
            sources.append(((("role", s.get("role", "")), ("rank", str(rank))), s["tokens_per_expert"]))
    if not sources:
        return []
    out = [f"# TYPE {p}expert_tokens_total counter"]
    for labels, counts in sources:
        out += [f"{p}expert_tokens_total{_labels(labels + (('expert', str(e)),))} {n}"
                for e, n in enumerate(counts)]
    return out

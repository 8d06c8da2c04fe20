"""Prometheus text exposition (format 0.0.4) without a client library: counters, gauges and
histograms the frontend updates on its event loop, plus engine gauges read at scrape time."""
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

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(("endpoint", endpoint), ("status", str(status)))] += 1
        self.latency.observe(seconds)

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
        for k in ("num_running", "num_waiting", "num_free_blocks", "num_total_blocks"):
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

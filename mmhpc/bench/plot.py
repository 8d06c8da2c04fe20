"""PNG plots of bench results (matplotlib if installed; else a message and no file)."""
from __future__ import annotations


def plot_serve(result: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return False
    reqs = [r for r in result["per_request"] if r["ok"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    start = [r["start_s"] for r in reqs]
    axes[0].scatter(start, [r["ttft_s"] * 1e3 for r in reqs], s=8, label="TTFT")
    axes[0].scatter(start, [r["e2el_s"] * 1e3 for r in reqs], s=8, label="E2EL")
    axes[0].set(xlabel="request start (s)", ylabel="ms", title="latency per request")
    axes[0].legend()
    names = ["ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"]
    keys = [k for k in result["ttft_ms"] if k.startswith("p") or k in ("mean", "median")]
    for n in names[:3]:
        axes[1].plot(keys, [result[n][k] for k in keys], marker="o", label=n[:-3].upper())
    axes[1].set(ylabel="ms", title="TTFT / TPOT / ITL")
    axes[1].legend()
    axes[2].bar(["req/s", "out tok/s / 100"],
                [result["request_throughput"], result["output_throughput"] / 100])
    axes[2].set(title=f"{result['completed']} requests in {result['duration_s']} s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True

"""`python -m mmhpc.bench` on the CPU with the tiny model: offline (engine + HF on the same
inputs) and the serving client against a real mmhpc server; metric definitions on data."""
from __future__ import annotations

import json

import pytest

from mmhpc.bench.__main__ import main
from mmhpc.bench.serve import RequestResult, metrics


def test_offline_engine_and_hf(tmp_path):
    out = tmp_path / "offline.json"
    main(["offline", "--model", "tiny:llava", "--num-requests", "4", "--image-size", "32",
          "--image-size", "48x40", "--prompt-len", "5", "--output-len", "4", "--max-num-seqs", "4",
          "--hf", "--hf-batch-sizes", "2", "--preprocess-workers", "2", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["mmhpc"]["num_output_tokens"] == 4 * 4
    assert res["mmhpc"]["output_tokens_per_s"] > 0
    assert res["hf"]["batches"][0]["num_output_tokens"] == 4 * 4
    assert res["speedup_vs_hf_best"] > 0


def test_offline_qwen2_vl(tmp_path):
    out = tmp_path / "q.json"
    main(["offline", "--model", "tiny:qwen2_vl", "--num-requests", "3", "--image-size", "56x84",
          "--images-per-request", "2", "--prompt-len", "3", "--output-len", "3",
          "--json", str(out)])
    res = json.loads(out.read_text())["mmhpc"]
    assert res["num_output_tokens"] == 9
    assert len(res["gc"]["collections"]) == 3 and res["gc"]["seconds"] >= 0


def test_metrics_definitions():
    rs = [RequestResult(ok=True, ttft=0.1, latency=0.5, itl=[0.1, 0.1, 0.2], output_tokens=5,
                        prompt_tokens=10),
          RequestResult(ok=True, ttft=0.3, latency=0.3, itl=[], output_tokens=1, prompt_tokens=7),
          RequestResult(ok=False, error="HTTP 500")]
    m = metrics(rs, 2.0, [50, 99], {"ttft": 200})
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 3.0
    assert m["total_token_throughput"] == 11.5
    assert m["tpot_ms"]["mean"] == pytest.approx(100.0)       # (0.5 - 0.1) / 4
    assert m["ttft_ms"]["median"] == pytest.approx(200.0)
    assert m["itl_ms"]["mean"] == pytest.approx(400 / 3, abs=1e-3)
    assert m["goodput"] == 0.5                                   # only the first meets TTFT


def test_serve_client_against_mmhpc(tiny_llava, tmp_path):
    from mmhpc.config import Config
    from mmhpc.server.app import ServerThread
    st = ServerThread(Config.from_dict({
        "model": {"path": str(tiny_llava), "max_model_len": 512}, "cache": {"num_blocks": 128},
        "server": {"host": "127.0.0.1", "port": 0}, "media": {"allow_private_urls": True}}))
    url = st.start()
    try:
        out = tmp_path / "serve.json"
        main(["serve", "--url", url, "--num-prompts", "6", "--concurrency", "3",
              "--input-len", "5", "--output-len", "5", "--image-size", "24x16",
              "--goodput", "ttft:60000", "--json", str(out), "--plot", str(tmp_path / "s.png")])
        res = json.loads(out.read_text())
        assert res["completed"] == 6 and res["failed"] == 0, res.get("errors")
        assert res["total_output_tokens"] == 30                   # usage: ignore_eos honoured
        assert res["goodput"] == res["request_throughput"]
        assert set(res["ttft_ms"]) >= {"mean", "median", "p50", "p90", "p99"}
        main(["serve", "--url", url, "--num-prompts", "4", "--rate", "50", "--input-len", "3",
              "--output-len", "3", "--json", str(out)])
        assert json.loads(out.read_text())["completed"] == 4
    finally:
        st.stop()


@pytest.mark.slow
def test_dense_vlm_gpu_smoke(tmp_path):
    """bench/dense_vlm_gpu.py's CPU smoke mode (the tiny LLaVA-NeXT and Qwen2.5-VL): decode
    steps timed; our vision path (Qwen2.5-VL: the fused blocks' plain-torch fallbacks) equals
    HF's on a 1920 x 1080 image and is timed beside it."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(root / "bench" / "dense_vlm_gpu.py"), "--smoke"],
                   cwd=root, env=env, check=True, timeout=600, capture_output=True)
    res = json.loads((tmp_path / "dense_vlm_gpu.json").read_text())
    for family in ("llava_next", "qwen2_5_vl"):
        r = res[family]
        assert "error" not in r, r.get("error")
        assert r["decode_b1_ms_wall"] > 0
        v = r["vision_1080p"]
        assert v["check"] == "ok" and v["mmhpc_ms"] > 0 and v["hf_ms"] > 0, v

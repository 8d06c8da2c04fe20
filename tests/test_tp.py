"""Tensor parallelism: KV head layout across TP sizes (pure functions, NIXL reads simulated by
byte copies), and the HF oracle over HTTP under `mpirun`: agg tp=2, E/P/D with prefill tp=2 →
decode tp=1 and prefill tp=1 → decode tp=2; both families; GQA with KV heads split (2 heads)
and replicated (1 head, tp=2); a slow decode TP follower, and one whose READ fails. Each
deployment starts once per module."""
from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mmhpc.distributed.kv_layout import head_reads as _head_reads, heads_of, plan_tp_reads
from mmhpc.transport.descs import NixlDescs

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
N = 6


# ---------------------------------------------------------------- KV layout (pure functions)

def test_heads_of_split_and_replicated():
    assert [heads_of(4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]
    assert [heads_of(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert heads_of(1, 2, 1) == (0, 1)
    with pytest.raises(ValueError):
        heads_of(4, 3, 0)


def test_head_reads_pick_owners():
    def head_reads(*a):
        return [(r.src_rank, r.src_head, r.dst_head, r.num_heads) for r in _head_reads(*a)]
    assert head_reads(4, 2, 1, 0) == [(0, 0, 0, 2), (1, 0, 2, 2)]   # prefill tp2 -> decode tp1
    assert head_reads(4, 1, 2, 1) == [(0, 2, 0, 2)]                 # prefill tp1 -> decode tp2
    # replicated on prefill (kv 2, tp 4): decode ranks spread reads over the replicas
    assert head_reads(2, 4, 2, 0) == [(0, 0, 0, 1)]
    assert head_reads(2, 4, 2, 1) == [(3, 0, 0, 1)]


def _pools(full: torch.Tensor, k: int, tp: int):
    """Per-rank pools [L, 2, NB, K/tp, BS, D] (contiguous) cut from a full pool."""
    return [full[:, :, :, slice(*heads_of(k, tp, r))].contiguous() for r in range(tp)]


def _read(local: NixlDescs, remote: NixlDescs, mem: dict[int, torch.Tensor]) -> None:
    """NIXL READ by hand: copy each remote region's bytes into the matching local region."""
    def view(addr: int, n: int) -> torch.Tensor:
        for base, t in mem.items():
            if base <= addr and addr + n <= base + t.numel() * t.element_size():
                return t.view(-1).view(torch.uint8)[addr - base:addr - base + n]
        raise AssertionError(f"region {addr}+{n} outside every pool")
    assert len(local.regions) == len(remote.regions)
    for (la, ln, _), (ra, rn, _) in zip(local.regions, remote.regions):
        assert ln == rn
        view(la, ln).copy_(view(ra, rn))


@pytest.mark.parametrize("k,src_tp,dst_tp", [(4, 2, 1), (4, 1, 2), (4, 2, 4), (4, 4, 2),
                                             (2, 1, 4), (2, 4, 1), (2, 4, 2), (1, 2, 1),
                                             (1, 1, 2), (2, 2, 2)])
def test_plan_tp_reads_moves_the_right_heads(k, src_tp, dst_tp):
    L, NB, BS, D = 2, 6, 4, 8
    full = torch.randn(L, 2, NB, k, BS, D)
    src = _pools(full, k, src_tp)
    src_blocks, dst_blocks = [4, 1, 2, 3], [0, 2, 3, 5]
    mem, descs = {}, []
    for r, t in enumerate(src):
        base = (r + 1) << 24
        mem[base] = t
        descs.append(NixlDescs(f"p{r}", "DRAM", [[base, t.numel() * 4, 0]]))
    for d in range(dst_tp):
        h0, h1 = heads_of(k, dst_tp, d)
        dst = torch.zeros(L, 2, NB, h1 - h0, BS, D)
        base = 100 << 24
        mem[base] = dst
        pool = NixlDescs(f"d{d}", "DRAM", [[base, dst.numel() * 4, 0]])
        reads = plan_tp_reads(k, descs, src_blocks, pool, dst_blocks, dst_tp, d,
                              num_layers=L, block_size=BS, head_dim=D, itemsize=4)
        ranks = [r for r, _, _ in reads]
        assert ranks == sorted(set(ranks))                       # one READ per prefill rank
        for r, local, remote in reads:
            assert remote.agent == f"p{r}" and local.agent == f"d{d}"
            _read(local, remote, mem)
        assert torch.equal(dst[:, :, dst_blocks], full[:, :, src_blocks, h0:h1])
        untouched = [b for b in range(NB) if b not in dst_blocks]
        assert not dst[:, :, untouched].any()


# ---------------------------------------------------------------- HF oracle over HTTP, mpirun

class HF:
    """HF generate on a checkpoint: the oracle."""

    def __init__(self, path: Path):
        from transformers import AutoModelForImageTextToText, GenerationConfig
        from mmhpc.tools.tiny import hf_processor
        self.proc = hf_processor(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        self.gen = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)

    def expected(self, text: str, images: list) -> list[str]:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = self.proc.apply_chat_template([{"role": "user", "content": content}],
                                               add_generation_prompt=True, tokenize=False)
        inputs = dict(self.proc(text=[prompt], images=images or None, return_tensors="pt"))
        with torch.no_grad():
            out = self.model.generate(**inputs, generation_config=self.gen, max_new_tokens=N)
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        return [self.proc.tokenizer.decode([t]) for t in ids]


class Deployment:
    """`mpirun -n N python -m mmhpc ...` serving HTTP on a free port; stopped by SIGTERM."""

    def __init__(self, n: int, overrides: list[str], env: dict | None = None):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
        self.proc = subprocess.Popen(
            [MPIRUN, "-n", str(n), sys.executable, "-m", "mmhpc", "server.host=127.0.0.1",
             "server.port=0", *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url = None
        ready = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("mmhpc ready: "):
                    self.url = line.split()[2]      # "mmhpc ready: URL (layout)"
                    ready.set()
            ready.set()
        threading.Thread(target=pump, daemon=True).start()
        ready.wait(180)
        if self.url is None:
            self.stop()
            raise AssertionError("deployment did not start:\n" + "".join(self.lines[-40:]))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _png_url(img) -> str:
    b = io.BytesIO()
    img.save(b, "PNG")
    return "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()


def _image(w: int, h: int, seed: int):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g,
                                         dtype=torch.uint8).numpy())


def chat_tokens(url: str, model: str, text: str, images: list) -> list[str]:
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    content = [{"type": "image_url", "image_url": {"url": _png_url(im)}} for im in images]
    content.append({"type": "text", "text": text})
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                       max_tokens=N, temperature=0, logprobs=True,
                                       extra_body={"ignore_eos": True})
    return [t.token for t in r.choices[0].logprobs.content]


CASES = [("tell me a story about the sea", []), ("what is in the picture?", [(32, 32, 1)]),
         ("compare these two", [(32, 32, 2), (48, 40, 3)])]


# (id, family, kv heads, ranks, overrides[, env]): KV heads split or replicated; E/P/D with
# prefill and decode of different TP sizes (decode READs each head from the prefill rank
# holding it). slow_follower: decode's TP follower starts its READs 0.5 s after the leader;
# prefill must not free (and reuse) the blocks when the leader's READ is done (it did: the
# follower then read another prompt's KV into the last block; one token in six went wrong).
DEPLOYMENTS = [
    ("agg_tp2-llava-kv2", "llava", 2, 2, ["deployment.aggregated.tp=2"]),
    ("agg_tp2-qwen2_vl-kv1", "qwen2_vl", 1, 2, ["deployment.aggregated.tp=2"]),
    ("e_p2_d1-llava-kv2", "llava", 2, 5, ["deployment=e_p_d", "deployment.prefill.tp=2"]),
    ("e_p1_d2-qwen2_vl-kv1", "qwen2_vl", 1, 5, ["deployment=e_p_d", "deployment.decode.tp=2"]),
    ("e_p1_d2-qwen2_vl-kv1-slow_follower", "qwen2_vl", 1, 5,
     ["deployment=e_p_d", "deployment.decode.tp=2"],
     {"MMHPC_TEST_FOLLOWER_PULL_DELAY_S": "0.5"}),
]


@pytest.fixture(scope="module", params=DEPLOYMENTS, ids=[d[0] for d in DEPLOYMENTS])
def deployment(request):
    from mmhpc.tools.tiny import tiny_checkpoint
    name, family, kv, ranks, overrides, *env = request.param
    path = tiny_checkpoint(family, kv_heads=kv)
    dep = Deployment(ranks, [f"model.path={path}", "model.max_model_len=512",
                             "cache.num_blocks=128", "cache.block_size=4", *overrides],
                     env[0] if env else None)
    yield dep, path, HF(path)
    rc = dep.stop()
    # agg: rank 0 drains, then stops its followers: exit 0. E/P/D workers die by SIGTERM.
    assert rc == 0 or (name.startswith("e_") and rc in (15, 143, -15)), "".join(dep.lines[-40:])


def assert_oracle_over_http(url: str, model: str, hf: HF, cases) -> None:
    """Every (text, image sizes) case sent at once (batched steps); each one's tokens equal
    its own HF generate's."""
    results: dict[int, list[str]] = {}

    def one(i: int) -> None:
        text, sizes = cases[i]
        results[i] = chat_tokens(url, model, text, [_image(*s) for s in sizes])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    expected = {i: hf.expected(text, [_image(*s) for s in sizes])
                for i, (text, sizes) in enumerate(cases)}
    for t in threads:
        t.join(180)
    assert results == expected


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_tp_oracle_over_http(deployment):
    dep, path, hf = deployment
    assert_oracle_over_http(dep.url, path.name, hf, CASES)   # batched across the TP group


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_follower_pull_failure_fails_the_request_only():
    """A decode TP follower whose READ fails: the request gets an error (not tokens decoded
    from half-valid KV), prefill gets its blocks back, and the job keeps serving."""
    import json
    import urllib.request

    import openai
    from mmhpc.tools.tiny import tiny_checkpoint
    path = tiny_checkpoint("qwen2_vl", kv_heads=1)
    dep = Deployment(5, [f"model.path={path}", "model.max_model_len=512", "cache.num_blocks=128",
                         "cache.block_size=4", "deployment=e_p_d", "deployment.decode.tp=2"],
                     {"MMHPC_TEST_FOLLOWER_PULL_FAIL": "1"})
    try:
        for _ in range(2):
            with pytest.raises(openai.APIError, match="TP follower"):
                chat_tokens(dep.url, path.name, "tell me a story about the sea", [])

        def retained() -> dict:
            with urllib.request.urlopen(dep.url + "/debug/ranks", timeout=10) as r:
                ranks = json.load(r)
            return {k: v["num_retained"] for k, v in ranks.items() if v["role"] == "prefill"}
        end = time.monotonic() + 10
        while any(retained().values()) and time.monotonic() < end:
            time.sleep(0.2)
        assert not any(retained().values()), retained()
        with urllib.request.urlopen(dep.url + "/health", timeout=10) as r:
            assert r.status == 200
    finally:
        dep.stop()

"""GPU serving check (issues 7, 10) on ONE GPU, in one device call: `bash bench/gpu_serve.sh`.

  python bench/gpu_serve.py all [--gpu] [--parts agg-llava,...] [--big]
  python bench/gpu_serve.py refs --family F --ckpt DIR --out refs.json   (a helper step)

1. tiny checkpoints (`python -m mmhpc.tools.tiny`), HF `generate(do_sample=False)` references in
   float32 on the CPU (and on the GPU where there is one, compared with the CPU's);
2. the tiny servers, started together: agg (1 rank) and E/P/D (`$MPIRUN -n 4 ...
   deployment=e_p_d`) for both families; with --gpu every rank on cuda:0
   (`cluster.gpus_per_node=1`: the ranks share the GPU, NIXL pools in VRAM). Each prompt alone,
   then 16 concurrent requests: the greedy tokens over HTTP (logprobs' token strings, ignore_eos)
   equal HF's token for token, and the prompt token count equals HF's input length;
3. --big: LLaVA-1.5-7B shapes with random bf16 weights (`arch:llava-1.5-7b` config + the tiny
   tokenizer, image_token_index moved to its `<image>` id): E/P/D then agg on the same card,
   `python -m mmhpc.bench serve` with one 336 px image per request: TTFT / TPOT.
Everything goes to stdout and $OUT/gpu_serve.json (server logs' tails on failure).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MAX_TOKENS = 12
NUM_CONCURRENT = 16
# (id, text, [(seed, w, h) per image]): images come first in the message, as in tests/test_oracle
PROMPTS = [
    ("text", "Say something about number 3.", []),
    ("text2", "Tell me a story about seven.", []),
    ("img1", "Describe picture 1.", [(1, 40, 56)]),
    ("img1b", "What is in this image?", [(4, 64, 48)]),
    ("img2", "Compare the two pictures.", [(2, 30, 30), (5, 72, 40)]),
    ("img2b", "Which one is brighter?", [(0, 48, 48), (3, 56, 40)]),
]


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def make_image(seed: int, w: int, h: int):
    import numpy as np
    from PIL import Image
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8),
                           "RGB")


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------------- references
def refs_main(args) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig
    from mmhpc.tools.tiny import hf_processor
    torch.set_num_threads(2)
    proc = hf_processor(args.ckpt)
    tok = proc.tokenizer
    gen = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    out = {"family": args.family, "prompts": {}}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        t0 = time.time()
        hf = AutoModelForImageTextToText.from_pretrained(args.ckpt, dtype=torch.float32).to(dev).eval()
        for pid, text, imgs in PROMPTS:
            images = [make_image(*s) for s in imgs]
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
            prompt = proc.apply_chat_template([{"role": "user", "content": content}],
                                              add_generation_prompt=True, tokenize=False)
            inputs = {k: v.to(dev) for k, v in
                      proc(text=[prompt], images=images or None, return_tensors="pt").items()}
            with torch.no_grad():
                ids = hf.generate(**inputs, generation_config=gen, max_new_tokens=MAX_TOKENS)
            new = ids[0, inputs["input_ids"].shape[1]:].tolist()
            if dev == "cpu":
                out["prompts"][pid] = {"ids": new, "tokens": [tok.decode([t]) for t in new],
                                       "text": tok.decode(new, skip_special_tokens=True),
                                       "prompt_len": int(inputs["input_ids"].shape[1])}
            else:
                out["prompts"][pid]["gpu_equal_cpu"] = new == out["prompts"][pid]["ids"]
        out[f"{dev}_s"] = round(time.time() - t0, 2)
        del hf
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"refs {args.family}: " + ", ".join(
        f"{k} gpu==cpu {v.get('gpu_equal_cpu', '-')}" for k, v in out["prompts"].items()), flush=True)


# ---------------------------------------------------------------------------------- servers
class Server:
    def __init__(self, name: str, ranks: int, overrides: list[str], work: Path):
        self.name, self.ranks = name, ranks
        self.log_path = work / f"{name}.log"
        base = [PY, "-m", "mmhpc", "server.port=0", "server.host=127.0.0.1", *overrides]
        self.cmd = base if ranks == 1 else [*os.environ.get("MPIRUN", "mpirun").split(),
                                             "-n", str(ranks), *base]
        self.url, self.proc, self.t0, self.ready_s = "", None, 0.0, None

    def start(self) -> "Server":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("MMHPC_URL_FILE", None)
        self._log = open(self.log_path, "w")
        self.t0 = time.monotonic()
        log(f"start {self.name}: {' '.join(self.cmd)}")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("mmhpc ready: "):
                    self.url = line.split()[2]      # "mmhpc ready: URL (layout)"
                    self.ready_s = round(time.monotonic() - self.t0, 1)
                    log(f"{self.name} ready in {self.ready_s} s: {self.url}")
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode} before ready")
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready in time")

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass
        return self.proc.returncode


def http_json(url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def chat(url: str, model: str, pid: str) -> dict:
    _, text, imgs = next(p for p in PROMPTS if p[0] == pid)
    parts = [{"type": "image_url", "image_url": {"url": data_url(make_image(*s))}} for s in imgs]
    parts.append({"type": "text", "text": text})
    t0 = time.monotonic()
    r = http_json(url + "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": parts}],
        "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": True})
    ch = r["choices"][0]
    return {"text": ch["message"]["content"],
            "tokens": [t["token"] for t in (ch.get("logprobs") or {}).get("content", [])],
            "prompt_tokens": r["usage"]["prompt_tokens"], "s": round(time.monotonic() - t0, 3)}


def check(server: Server, refs: dict) -> dict:
    model = http_json(server.url + "/v1/models")["data"][0]["id"]
    res = {"ready_s": server.ready_s, "single": {}, "concurrent": None}
    ok = True

    def compare(pid: str, got: dict) -> dict:
        ref = refs["prompts"][pid]
        c = {"tokens_equal": got["tokens"] == ref["tokens"], "text_equal": got["text"] == ref["text"],
             "prompt_len_equal": got["prompt_tokens"] == ref["prompt_len"], "s": got["s"]}
        if not (c["tokens_equal"] and c["prompt_len_equal"]):
            c.update(got=got, ref={k: ref[k] for k in ("tokens", "text", "prompt_len")})
        return c

    for pid, *_ in PROMPTS:
        c = compare(pid, chat(server.url, model, pid))
        res["single"][pid] = c
        ok &= c["tokens_equal"] and c["prompt_len_equal"]
    pids = [PROMPTS[i % len(PROMPTS)][0] for i in range(NUM_CONCURRENT)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(NUM_CONCURRENT) as pool:
        got = list(pool.map(lambda p: chat(server.url, model, p), pids))
    cmp = [compare(p, g) for p, g in zip(pids, got)]
    n_ok = sum(c["tokens_equal"] and c["prompt_len_equal"] for c in cmp)
    res["concurrent"] = {"n": NUM_CONCURRENT, "equal": n_ok, "wall_s": round(time.monotonic() - t0, 3),
                         "failures": [c for c in cmp if not (c["tokens_equal"] and c["prompt_len_equal"])][:3]}
    ok &= n_ok == NUM_CONCURRENT
    res["passed"] = bool(ok)
    return res


# ---------------------------------------------------------------------------------- big model
def big_dir(work: Path, tiny_llava: Path) -> Path:
    """LLaVA-1.5-7B's config with the tiny tokenizer (random weights: tokens are ids only)."""
    from mmhpc.models.arch import arch_dir
    src = arch_dir("arch:llava-1.5-7b")
    dst = work / "llava-7b-arch"
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    tcfg = json.loads((tiny_llava / "config.json").read_text())
    cfg["image_token_index"] = tcfg.get("image_token_index", 3)   # the tokenizer's <image>
    cfg["pad_token_id"] = 0
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    shutil.copy(src / "preprocessor_config.json", dst)
    (dst / "processor_config.json").write_text(json.dumps(       # llava-hf/llava-1.5-7b-hf's
        {"image_token": "<image>", "patch_size": 14, "num_additional_image_tokens": 1,
         "vision_feature_select_strategy": "default"}))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
              "special_tokens_map.json"):
        if (tiny_llava / f).exists():
            shutil.copy(tiny_llava / f, dst)
    # Every id the random model can emit must decode to text: the 2026-11-25 run used the tiny
    # 640-token vocabulary as is, so ids >= 640 streamed as empty deltas and the serve client's
    # TTFT / ITL (first / next *content* chunk) were wrong. Pad with one plain token per id.
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(dst)
    if len(tok) < cfg["text_config"]["vocab_size"]:
        tok.add_tokens([f"w{i}" for i in range(len(tok), cfg["text_config"]["vocab_size"])])
        tok.save_pretrained(dst)
    return dst


def bench_serve(server: Server, work: Path, tag: str, conc: int, n: int) -> dict:
    path = work / f"bench_{tag}.json"
    cmd = [PY, "-m", "mmhpc.bench", "serve", "--url", server.url, "--num-prompts", str(n),
           "--concurrency", str(conc), "--image-size", "336x336", "--images-per-request", "1",
           "--input-len", "40", "--output-len", "64", "--json", str(path)]
    log(" ".join(cmd[1:]))
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    print(p.stdout[-3000:], p.stderr[-2000:], flush=True)
    if not path.exists():
        return {"error": p.stderr[-1000:]}
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "per_request"}


# ---------------------------------------------------------------------------------- all
def all_main(args) -> None:
    out = Path(os.environ.get("OUT", "/tmp/gpu_serve_out"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "gpu": args.gpu, "mpirun": os.environ.get("MPIRUN", "mpirun"), "parts": {}}
    save = lambda: (out / "gpu_serve.json").write_text(json.dumps(results, indent=1))
    if args.gpu:
        try:
            results["card"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    end = time.monotonic() + args.budget_s
    gpu_o = ["cluster.gpus_per_node=1"] if args.gpu else []
    fams = {"llava": work / "tiny_llava", "qwen2_vl": work / "tiny_qwen2_vl"}
    parts = [p for p in args.parts.split(",") if p]

    # 1. checkpoints (built once, then every server reads the same directory)
    t0 = time.monotonic()
    builds = {f: subprocess.Popen([PY, "-m", "mmhpc.tools.tiny", "--family", f, "--out", str(d)],
                                  cwd=ROOT) for f, d in fams.items() if not (d / "config.json").exists()}
    for f, p in builds.items():
        if p.wait() != 0:
            results["parts"][f"build-{f}"] = {"passed": False}
    log(f"tiny checkpoints built in {time.monotonic() - t0:.1f} s")
    big = None
    if args.big:
        big = big_dir(work, fams["llava"])
    ref_procs = {f: subprocess.Popen([PY, __file__, "refs", "--family", f, "--ckpt", str(d),
                                      "--out", str(work / f"refs_{f}.json")], cwd=ROOT)
                 for f, d in fams.items()}

    # 2. tiny servers, all at once (they share the card: KV pools fixed by cache.num_blocks)
    servers: dict[str, Server] = {}
    for part in parts:
        kind, fam = part.split("-")
        ranks, dep = (1, ["deployment=agg"]) if kind == "agg" else (4, ["deployment=e_p_d"])
        servers[part] = Server(part, ranks, [f"model.path={fams[fam]}", "model.dtype=float32",
                                             "media.allow_private_urls=true", "cache.num_blocks=512",
                                             *dep, *gpu_o], work).start()
    big_epd = None
    big_o = [f"model.path={big}", "model.random_weights=true", "model.dtype=bfloat16",
             "media.allow_private_urls=true", f"cache.num_blocks={args.big_blocks}",
             "model.max_model_len=2048", *gpu_o]
    if big is not None:
        big_epd = Server("big-e_p_d", 4, [*big_o, "deployment=e_p_d"], work).start()
    refs = {}
    for f, p in ref_procs.items():
        rc = p.wait()
        refs[f] = json.loads((work / f"refs_{f}.json").read_text()) if rc == 0 else None
    results["refs"] = {f: ({k: v for k, v in r.items() if k != "prompts"} |
                           {"gpu_equal_cpu": {k: v.get("gpu_equal_cpu") for k, v in r["prompts"].items()}})
                       if r else None for f, r in refs.items()}
    for part, srv in servers.items():
        fam = part.split("-")[1]
        try:
            srv.wait_ready(min(end, time.monotonic() + args.ready_s))
            if refs[fam] is None:
                raise RuntimeError(f"no HF references for {fam}")
            r = check(srv, refs[fam])
        except Exception as e:  # noqa: BLE001 (each part reports, the rest goes on)
            r = {"passed": False, "error": f"{type(e).__name__}: {e}", "log_tail": srv.tail()}
        r["rc_after_stop"] = srv.stop()
        results["parts"][part] = r
        log(f"{part}: passed={r['passed']}", json.dumps({k: v for k, v in r.items() if k != "log_tail"})[:1500])
        if not r["passed"]:
            print(f"----- {part} log tail -----\n{srv.tail()}\n-----", flush=True)
        save()
    for srv in servers.values():
        srv.stop()

    # 3. LLaVA-1.5-7B random bf16: E/P/D then agg on the same card
    if big_epd is not None:
        for name, mk in (("big-e_p_d", lambda: big_epd),
                         ("big-agg", lambda: Server("big-agg", 1, [*big_o, "deployment=agg"], work).start())):
            if time.monotonic() > end - 40:
                results["parts"][name] = {"passed": False, "error": "skipped: out of time"}
                continue
            srv = mk()
            try:
                srv.wait_ready(min(end - 20, time.monotonic() + args.ready_s + 60))
                r = {"ready_s": srv.ready_s,
                     "c1": bench_serve(srv, work, f"{name}_c1", 1, args.big_n),
                     "c8": bench_serve(srv, work, f"{name}_c8", 8, 2 * args.big_n)}
                r["passed"] = all("error" not in r[k] and r[k].get("completed", 0) > 0 for k in ("c1", "c8"))
            except Exception as e:  # noqa: BLE001
                r = {"passed": False, "error": f"{type(e).__name__}: {e}"}
            if not r["passed"]:
                r["log_tail"] = srv.tail()
                print(f"----- {name} log tail -----\n{srv.tail()}\n-----", flush=True)
            r["rc_after_stop"] = srv.stop()
            results["parts"][name] = r
            log(f"{name}:", json.dumps({k: v for k, v in r.items() if k != "log_tail"})[:3000])
            save()
    save()
    log("summary:", {k: v.get("passed") for k, v in results["parts"].items()})


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("refs")
    r.add_argument("--family", required=True)
    r.add_argument("--ckpt", required=True)
    r.add_argument("--out", required=True)
    a = sub.add_parser("all")
    a.add_argument("--gpu", action="store_true", help="every rank on cuda:0 (cluster.gpus_per_node=1)")
    a.add_argument("--parts", default="agg-llava,agg-qwen2_vl,epd-llava,epd-qwen2_vl")
    a.add_argument("--big", action="store_true", help="also LLaVA-1.5-7B random bf16, E/P/D vs agg")
    a.add_argument("--big-blocks", type=int, default=512)
    a.add_argument("--big-n", type=int, default=8)
    a.add_argument("--work", default="/tmp/gpu_serve_work")
    a.add_argument("--ready-s", type=float, default=150)
    a.add_argument("--budget-s", type=float, default=360)
    args = p.parse_args()
    refs_main(args) if args.cmd == "refs" else all_main(args)


if __name__ == "__main__":
    main()

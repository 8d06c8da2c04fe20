"""`python -m mmhpc.bench offline`: engine throughput on a synthetic image+text set, and
optionally HF `generate` (static batches) on the same inputs in the same run.

Timed: preprocessing (a thread pool, overlapped with the engine's GPU work: `PreprocessFeed`)
+ vision encoding (inside the engine's steps, batched per step) + prefill + decode, from the
first image handed to the processor to the last token."""
from __future__ import annotations

import argparse
import gc
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from mmhpc.bench.inputs import ImageItems, build_prompt
from mmhpc.bench.synthetic import make_requests, parse_size


class _StubTokenizer:
    """Detokenization stand-in: one letter per id (the bench measures the model, not text)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


class _StubProcessor:
    def __init__(self, eos_token_ids):
        self.tokenizer = _StubTokenizer()
        self.eos_token_ids = list(eos_token_ids)


def resolve_model_path(path: str) -> tuple[str, Path]:
    """(engine model path, a directory with config.json + preprocessor config)."""
    if path.startswith("tiny:"):
        from mmhpc.tools.tiny import tiny_checkpoint
        d = tiny_checkpoint(path[5:])
        return str(d), d
    from mmhpc.models.arch import arch_dir, is_arch
    if is_arch(path):
        return path, arch_dir(path)
    return path, Path(path)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny:llava",
                   help="tiny:<family>, arch:<name> (mmhpc/models/arch.py) or a checkpoint dir")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--image-size", action="append", default=None,
                   help="WxH or S; repeat to cycle sizes (default 336)")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=40, help="text tokens per request")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step (default: 16384 on CUDA, as vLLM's offline "
                        "LLM on a large GPU; else 8192)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--preprocess-workers", type=int, default=4)
    p.add_argument("--preprocess", choices=("overlap", "first"), default="overlap",
                   help="overlap: requests join the engine as their images are preprocessed; "
                        "first: preprocess every image, then start the engine")
    p.add_argument("--hf", action="store_true", help="also time HF generate on the same inputs")
    p.add_argument("--hf-batch-sizes", default="16,32,64")
    p.add_argument("--hf-max-requests", type=int, default=None,
                   help="time HF on the first N requests per batch size (budget)")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--profile-dir", default=None,
                   help="CUDA: profile the timed engine run (kernel table, GPU busy time per "
                        "kind of step) into this directory")


def run_engine(args, model_path: str, model_dir: Path, requests) -> dict:
    from mmhpc.config import Config
    from mmhpc.engine.engine import LLMEngine
    from mmhpc.engine.sequence import SamplingParams
    from mmhpc.models.arch import ARCHS
    cache = {"num_blocks": args.num_blocks} if args.num_blocks else {}
    config = Config.from_dict({
        "model": {"path": model_path, "dtype": args.dtype, "random_weights": args.random_weights,
                  "max_model_len": args.max_model_len, "seed": args.seed},
        "cache": cache,
        "scheduler": {"max_num_seqs": args.max_num_seqs,
                      "max_num_batched_tokens": args.max_num_batched_tokens
                      or (16384 if torch.cuda.is_available() else 8192)}})
    t0 = time.perf_counter()
    hf_config = _hf_config(model_path)
    eos = ARCHS[model_path[5:]]["eos_token_ids"] if model_path.startswith("arch:") else [2]
    engine = LLMEngine(config, processor=_StubProcessor(eos))
    load_s = time.perf_counter() - t0
    images = ImageItems(model_dir, hf_config)
    from collections import deque
    from mmhpc.multimodal.pipeline import PreprocessFeed
    runner = engine.runner
    sync = (lambda: torch.cuda.synchronize(runner.device)) if runner.device.type == "cuda" \
        else (lambda: None)
    # warm-up as HF's (one request, 2 tokens; other pixels, so no prefix-cache hits later)
    warm = make_requests(1, [requests[0].images[0].size] if requests[0].images else [(336, 336)],
                         len(requests[0].images), len(requests[0].text_ids), 2,
                         (16, min(hf_config.text_config.vocab_size, 32000)), seed=12345,
                         exclude_ids=(images.image_token_id,))[0]
    its = [images(im) for im in warm.images]
    engine.add_request("warm-up", build_prompt(its, warm.text_ids, images.image_token_id),
                       SamplingParams(max_tokens=2, ignore_eos=True), mm_items=its)
    while engine.has_unfinished_requests():
        engine.step()
    sync()
    gc_timer = _GcTimer()
    t0 = time.perf_counter()
    waiting = deque(requests)
    num_prompt = num_out = steps = 0
    # per kind of step (decode only / with prefill): [steps, seconds, tokens] (host wall clock;
    # a decode step's wall overlaps the next step's GPU work when the runner decodes ahead)
    step_times: dict[str, list] = {}
    last_sched: dict = {}
    schedule = engine.scheduler.schedule

    def timed_schedule():
        out = schedule()
        last_sched["tokens"] = out.num_batched_tokens
        last_sched["prefill"] = sum(s.is_prefill for s in out.scheduled)
        return out
    engine.scheduler.schedule = timed_schedule
    first: dict[str, float] = {}
    prof = _StepProfiler(args.profile_dir, runner.device)
    def preprocess(r):
        """In a feed thread: the images, the prompt and its prefix-cache block hashes (made
        while the engine's thread waits on the GPU, not in the next step's schedule)."""
        its = [images(im) for im in r.images]
        ids = build_prompt(its, r.text_ids, images.image_token_id)
        return its, ids, engine.prompt_block_hashes(ids, its)

    with prof, PreprocessFeed(preprocess, requests, args.preprocess_workers) as feed:
        while feed or engine.has_unfinished_requests():
            # hand over every request whose images are ready; when the engine idles, wait for
            # a step's worth of tokens (or, with --preprocess first, for all of them)
            if args.preprocess == "first":
                ready = _take_all(feed)
            elif engine.has_unfinished_requests():
                ready = feed.take()
            else:
                ready = _take_tokens(feed, config.scheduler.max_num_batched_tokens)
            for its, ids, hashes in ready:
                r = waiting.popleft()
                num_prompt += len(ids)
                engine.add_request(r.request_id, ids, SamplingParams(
                    max_tokens=r.output_len, ignore_eos=True), mm_items=its, block_hashes=hashes)
            ts = time.perf_counter()
            prof.step_start()
            for o in engine.step():
                num_out += len(o.new_token_ids)
                first.setdefault(o.request_id, time.perf_counter() - t0)
            steps += 1
            kind = "decode" if last_sched.get("prefill", 1) == 0 else "prefill_or_mixed"
            phase = step_times.setdefault(kind, [0, 0.0, 0])
            phase[0] += 1
            phase[1] += time.perf_counter() - ts
            phase[2] += last_sched.get("tokens", 0)
            prof.step_end(kind)
        sync()
        t1 = time.perf_counter()        # before the profiler's exit (it flushes for ~1 s)
    total = t1 - t0
    gc_stats = gc_timer.close()
    res = dict(engine="mmhpc", max_num_seqs=config.scheduler.max_num_seqs,
               max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
               num_requests=len(requests), num_prompt_tokens=num_prompt,
               num_output_tokens=num_out, load_s=round(load_s, 2),
               total_s=round(total, 3), steps=steps,
               output_tokens_per_s=round(num_out / total, 1),
               total_tokens_per_s=round((num_out + num_prompt) / total, 1),
               requests_per_s=round(len(requests) / total, 3),
               mean_ttft_s=round(sum(first.values()) / max(1, len(first)), 3),
               num_blocks=runner.num_blocks, num_preemptions=engine.num_preemptions,
               gc=gc_stats,
               steps_by_kind={k: dict(steps=v[0], seconds=round(v[1], 3), tokens=v[2])
                              for k, v in step_times.items()})
    if args.profile_dir:
        res["profile"] = prof.summary(total)
    del engine, runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


class _GcTimer:
    """Pauses of Python's cyclic garbage collector while alive (all threads): count per
    generation, total and longest pause."""

    def __init__(self):
        self.count = [0, 0, 0]
        self.total = self.longest = 0.0
        self._t = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        else:
            dt = time.perf_counter() - self._t
            self.count[info["generation"]] += 1
            self.total += dt
            self.longest = max(self.longest, dt)

    def close(self) -> dict:
        gc.callbacks.remove(self._cb)
        return dict(collections=self.count, seconds=round(self.total, 4),
                    longest_ms=round(self.longest * 1e3, 2))


class _StepProfiler:
    """`--profile-dir`: torch.profiler (CUDA kernels only) over the timed run, and a CUDA event
    at each step's start and end, so each kind of step reports its GPU span and the GPU's idle
    gap before it. Writes kernels.txt; `summary` returns busy time vs wall clock."""

    def __init__(self, out_dir, device):
        self.on = bool(out_dir) and device.type == "cuda"
        self.dir = out_dir
        self.events: list = []          # (kind, start event, end event)
        self._start = None
        self._prof = None

    def __enter__(self):
        if self.on:
            from torch.profiler import ProfilerActivity, profile
            Path(self.dir).mkdir(parents=True, exist_ok=True)
            self._prof = profile(activities=[ProfilerActivity.CUDA])
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self._prof is not None:
            torch.cuda.synchronize()
            self._prof.__exit__(*exc)

    def step_start(self):
        if self.on:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def step_end(self, kind: str):
        if self.on:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((kind, self._start, end))

    def summary(self, wall_s: float) -> dict:
        torch.cuda.synchronize()
        kinds: dict = {}
        prev = None
        for kind, a, b in self.events:
            k = kinds.setdefault(kind, {"steps": 0, "gpu_span_s": 0.0, "gap_before_s": 0.0})
            k["steps"] += 1
            k["gpu_span_s"] += a.elapsed_time(b) / 1e3
            if prev is not None:
                k["gap_before_s"] += prev.elapsed_time(a) / 1e3
            prev = b
        avg = self._prof.key_averages()
        rows = sorted(avg, key=lambda e: -e.self_device_time_total)
        busy = sum(e.self_device_time_total for e in rows) / 1e6
        text = avg.table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90)
        (Path(self.dir) / "kernels.txt").write_text(text)
        top = [{"name": e.key[:90], "calls": e.count,
                "s": round(e.self_device_time_total / 1e6, 4)} for e in rows[:25]]
        return {"wall_s": round(wall_s, 3), "gpu_kernels_s": round(busy, 3),
                "per_kind": {k: {kk: round(vv, 4) if isinstance(vv, float) else vv
                                 for kk, vv in v.items()} for k, v in kinds.items()},
                "top_kernels": top}


def tiny_engine_tokens(family: str, env: dict | None = None) -> tuple[list[int], tuple | None]:
    """The engine on a tiny checkpoint (float32, this machine's device) over a small mixed
    workload: 6 requests with images of two sizes, different prompt and output lengths
    (20 + 7 i tokens), 4 seats (admissions and finishes mid-run). `env` is set for the run
    (e.g. MMHPC_FAST_PATH=0). Returns every request's greedy tokens, in order, and the CUDA
    runner's (decode-ahead hits, misses) or None. The check of the CUDA fast path against the
    plain-torch path (tests/test_engine_gpu.py)."""
    from mmhpc.config import Config
    from mmhpc.engine.engine import LLMEngine
    from mmhpc.engine.sequence import SamplingParams
    from mmhpc.tools.tiny import tiny_checkpoint
    with env_set(env or {}):
        path = tiny_checkpoint(family)
        cfg = Config.from_dict({"model": {"path": str(path), "dtype": "float32",
                                          "max_model_len": 512},
                                "cache": {"num_blocks": 256}, "scheduler": {"max_num_seqs": 4}})
        eng = LLMEngine(cfg, processor=_StubProcessor([2]))
        items = ImageItems(path, _hf_config(str(path)))
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


@contextmanager
def env_set(env: dict):
    """Environment variables set for the block, restored (or removed) after it."""
    import os
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _take_tokens(feed, budget: int) -> list:
    """Wait for the next results (images, prompt ids, hashes) until their prompts hold
    `budget` tokens or the feed is done."""
    out, tokens = [], 0
    while feed and tokens < budget:
        got = feed.take(block=True)
        for res in got:
            tokens += len(res[1])
            out.append(res)
    return out


def _take_all(feed) -> list:
    out = []
    while feed:
        out += feed.take(block=True)
    return out


def _hf_config(model_path: str):
    from mmhpc.models import load_hf_config
    return load_hf_config(model_path)


def run(args) -> dict:
    model_path, model_dir = resolve_model_path(args.model)
    hf_config = _hf_config(model_path)
    sizes = [parse_size(s) for s in (args.image_size or ["336"])]
    vocab = hf_config.text_config.vocab_size
    image_id = getattr(hf_config, "image_token_index", None) or hf_config.image_token_id
    specials = tuple(i for i in (image_id, getattr(hf_config, "video_token_id", None),
                                 getattr(hf_config, "vision_start_token_id", None),
                                 getattr(hf_config, "vision_end_token_id", None)) if i is not None)
    requests = make_requests(args.num_requests, sizes, args.images_per_request, args.prompt_len,
                             args.output_len, (16, min(vocab, 32000)), args.seed, specials)
    out: dict = dict(model=args.model, image_sizes=[f"{w}x{h}" for w, h in sizes],
                     images_per_request=args.images_per_request, prompt_len=args.prompt_len,
                     output_len=args.output_len,
                     device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     date=time.strftime("%Y-%m-%d %H:%M:%S"))
    if args.hf:                   # first: the engine later takes most of the free memory
        from mmhpc.bench.hf_baseline import run_hf
        bss = [int(b) for b in args.hf_batch_sizes.split(",") if b]
        out["hf"] = run_hf(model_path, model_dir, hf_config, requests, bss,
                           args.hf_max_requests, args.dtype)
        best = max(out["hf"]["batches"], key=lambda r: r["output_tokens_per_s"], default=None)
        out["hf_best"] = best
    if not args.skip_engine:
        out["mmhpc"] = run_engine(args, model_path, model_dir, requests)
        if args.hf and out.get("hf_best"):
            out["speedup_vs_hf_best"] = round(out["mmhpc"]["output_tokens_per_s"]
                                              / out["hf_best"]["output_tokens_per_s"], 2)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return out

"""Host time of an engine decode step on this machine, by part: N text requests of 100
tokens decoding 64 each on the tiny LLaVA checkpoint (its real tokenizer), float32 CPU.
`host` = step time minus the model's `run_step`: what a GPU step would wait for when it is not
hidden (TP > 1, or a host slower than the GPU step).

    OMP_NUM_THREADS=1 .venv/bin/python bench/engine_host.py 256 [ids]

`ids`: the engine as a worker rank builds it (`detokenize=False`: token ids only, the
frontend makes the text).

    OMP_NUM_THREADS=1 .venv/bin/python bench/engine_host.py prefill [seeded]

Prefill steps of the offline bench's shape: 256 prompts of 616 tokens (text), 16-token
blocks, 16,384-token steps, one output token each, `detokenize=False`. `seeded`: the prompts'
block hashes made before `add_request` (as the offline bench's preprocessing threads do).
"""
from __future__ import annotations

import collections
import random
import sys
import time

import torch

from mmhpc.config import Config
from mmhpc.engine import engine as E, model_runner as MR, sampler as SA, scheduler as S
from mmhpc.engine.sequence import SamplingParams
from mmhpc.tools.tiny import tiny_checkpoint

PARTS = [(S.Scheduler, "schedule"), (S.Scheduler, "update"), (MR.ModelRunner, "execute"),
         (MR.ModelRunner, "run_step"), (SA.Sampler, "__call__"), (E.LLMEngine, "_postprocess")]


def timed(seconds: dict, cls, name: str) -> None:
    f = getattr(cls, name)

    def g(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            seconds[name] += time.perf_counter() - t
    setattr(cls, name, g)


def _timed_engine(scheduler: dict, cache: dict | None = None, detokenize: bool = True):
    """(engine on the tiny LLaVA checkpoint, seconds per part since the last clear)."""
    torch.set_num_threads(1)
    seconds: dict[str, float] = collections.defaultdict(float)
    for cls, name in PARTS:
        timed(seconds, cls, name)
    cfg = Config.from_dict({"model": {"path": str(tiny_checkpoint("llava")), "max_model_len": 1024},
                            "cache": cache or {}, "scheduler": scheduler})
    return E.LLMEngine(cfg, detokenize=detokenize), seconds


def _run_and_report(engine, seconds: dict, label: str, inputs: bool = False) -> None:
    """Step until done; per step: the wall time, each part, (input building), host."""
    num_steps, t0 = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        num_steps += 1
    total = time.perf_counter() - t0
    print(f"{label}, {num_steps} steps: {total / num_steps * 1e3:.2f} ms/step")
    for name, s in seconds.items():
        print(f"  {name:12s} {s / num_steps * 1e3:7.3f} ms/step")
    if inputs:
        print(f"  execute - run_step {(seconds['execute'] - seconds['run_step']) / num_steps * 1e3:7.3f}"
              f" ms/step (input building)")
    print(f"  host         {(total - seconds['run_step']) / num_steps * 1e3:7.3f} ms/step")


def main(num_requests: int, detokenize: bool = True) -> None:
    engine, seconds = _timed_engine({"max_num_seqs": num_requests,
                                     "max_num_batched_tokens": 8192}, detokenize=detokenize)
    rng = random.Random(0)
    for i in range(num_requests):
        engine.add_request(f"r{i}", [rng.randrange(10, 500) for _ in range(100)],
                           SamplingParams(max_tokens=64, ignore_eos=True))
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                          for s in engine.scheduler.running):
        engine.step()                                   # prefill steps: not counted
    seconds.clear()
    _run_and_report(engine, seconds, f"{num_requests} requests, decode")


def prefill(seeded: bool) -> None:
    engine, seconds = _timed_engine({"max_num_seqs": 256, "max_num_batched_tokens": 16384},
                                    {"block_size": 16, "num_blocks": 4096}, detokenize=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 500) for _ in range(616)] for _ in range(256)]
    hashes = [engine.prompt_block_hashes(p) if seeded else None for p in prompts]
    seconds.clear()
    for i, (p, h) in enumerate(zip(prompts, hashes)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=1, ignore_eos=True),
                           block_hashes=h)
    _run_and_report(engine, seconds, f"256 x 616-token prompts{' (seeded hashes)' if seeded else ''}",
                    inputs=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["prefill"]:
        prefill(sys.argv[2:3] == ["seeded"])
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 256, sys.argv[2:3] != ["ids"])

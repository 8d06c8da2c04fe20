"""Host time of the scheduler alone (schedule + update per step, no model, no torch):
N requests of P prompt tokens (one image of I placeholders at offset 1) decoding D tokens each,
16-token KV blocks, a B-token step budget. Prints prefill and decode step times in ms.

    .venv/bin/python bench/scheduler_host.py 256 616 576 128 16384   # the offline bench's shape
"""
from __future__ import annotations

import hashlib
import random
import statistics
import sys
import time

from mmhpc.config import CacheConfig, SchedulerConfig
from mmhpc.engine.scheduler import Scheduler
from mmhpc.engine.sequence import FinishReason, MMItem, SamplingParams, Sequence


def main(num_requests: int, prompt_len: int, image_tokens: int, max_tokens: int,
         budget: int) -> None:
    n = num_requests
    s = Scheduler(SchedulerConfig(max_num_seqs=n, max_num_batched_tokens=budget),
                  CacheConfig(block_size=16), n * (prompt_len + max_tokens) // 16 + 2 * n,
                  eos_token_ids=[2], max_model_len=prompt_len + max_tokens + 16)
    rng = random.Random(0)
    for i in range(n):
        text = [rng.randrange(3, 32000) for _ in range(prompt_len - image_tokens - 1)]
        item = MMItem(hashlib.sha256(str(i).encode()).hexdigest(), 1, image_tokens)
        s.add(Sequence(f"r{i}", [1] + [32000] * image_tokens + text,
                       SamplingParams(max_tokens=max_tokens, ignore_eos=True), [item]))
    prefill_ms, decode_ms = [], []
    while s.has_unfinished():
        t0 = time.perf_counter()
        out = s.schedule()
        s.update(out, {x.seq.request_id: 5 for x in out.scheduled if x.sample})
        for x in out.scheduled:
            if len(x.seq.output_token_ids) >= max_tokens:
                s.finish(x.seq, FinishReason.LENGTH)
        dt = (time.perf_counter() - t0) * 1e3
        (prefill_ms if any(x.is_prefill for x in out.scheduled) else decode_ms).append(dt)
    print(f"{n} x {prompt_len} tokens -> {max_tokens}, budget {budget}: "
          f"{len(prefill_ms)} prefill steps {sum(prefill_ms):.1f} ms "
          f"(mean {statistics.mean(prefill_ms):.2f}), {len(decode_ms)} decode steps "
          f"mean {statistics.mean(decode_ms):.3f} ms")


if __name__ == "__main__":
    main(*(int(x) for x in sys.argv[1:6]))

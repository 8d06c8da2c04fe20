"""CPU preprocessing overlapped with the engine's GPU work: a thread pool runs the image
processor over the inputs (it releases the GIL in its numpy/PIL work) while the caller hands
each result to the engine, in order, as soon as it is ready, and keeps stepping the engine.
The vision encoder then runs inside the engine's steps, batched over the images of the requests
each step schedules (`LLMEngine.step`)."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterable


class PreprocessFeed:
    def __init__(self, preprocess: Callable, inputs: Iterable, num_workers: int = 4):
        """preprocess(x) → result (CPU work), for every x of inputs, started now."""
        self._pool = ThreadPoolExecutor(max(1, num_workers))
        self._futures = deque(self._pool.submit(preprocess, x) for x in inputs)

    def __bool__(self) -> bool:
        return bool(self._futures)

    def take(self, block: bool = False) -> list:
        """The results ready now, in input order (stops at the first one not ready); with
        `block`, waits for at least one (when any is left). A preprocessing error is raised
        once, by the call that reaches it first (after the results before it were returned);
        the inputs after it go on."""
        out = []
        while self._futures:
            f = self._futures[0]
            if not f.done():
                if not block or out:
                    break
                wait([f])
            if f.exception() is not None and out:
                break
            self._futures.popleft()
            out.append(f.result())
        return out

    def close(self) -> None:
        for f in self._futures:
            f.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "PreprocessFeed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

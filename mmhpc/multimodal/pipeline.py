"""Batched vision encoding with CPU preprocessing overlapped: a thread pool runs the image
processor on batch i+1 while the GPU encodes batch i (the processor releases the GIL in its
numpy/PIL work; the encode call only queues kernels and waits at its end)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable


class EncodePipeline:
    def __init__(self, preprocess: Callable, encode: Callable, batch_size: int = 32,
                 num_workers: int = 4):
        """preprocess(x) → item (CPU); encode(list[item]) → None (sets embeddings, GPU)."""
        self.preprocess, self.encode = preprocess, encode
        self.batch_size, self.num_workers = batch_size, num_workers

    def run(self, inputs: Iterable) -> list:
        inputs = list(inputs)
        batches = [inputs[i:i + self.batch_size] for i in range(0, len(inputs), self.batch_size)]
        done: list = []
        if not batches:
            return done
        with ThreadPoolExecutor(self.num_workers) as pool:
            pending = [pool.submit(self.preprocess, x) for x in batches[0]]
            for i in range(len(batches)):
                items = [f.result() for f in pending]
                if i + 1 < len(batches):                 # CPU works on the next batch ...
                    pending = [pool.submit(self.preprocess, x) for x in batches[i + 1]]
                self.encode(items)                       # ... while the GPU encodes this one
                done.extend(items)
        return done

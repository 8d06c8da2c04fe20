"""The CUDA step: `StepInputs` → logits through `FastDecoder`, decode steps replayed from CUDA
graphs.

Decode steps (one new token per sequence, no images) of up to `max_num_seqs` rows are padded
to the next captured batch size and replayed from a graph whose inputs live in static buffers
(ids, positions, slots, block tables padded to the model's longest context, context lengths;
padding rows have slot -1 and context 0, so they write and read nothing). The host work of a
step is building five small numpy arrays and one copy each; the only sync is the sampler's.
Other steps (prefill chunks, mixed batches, images) run the same forward eagerly with the
varlen prefill kernel. `MMHPC_CUDA_GRAPHS=0` turns graphs off (eager decode kernel).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from mmhpc.engine.gpu_forward import FastDecoder, GpuAttnMeta


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class CudaStepRunner:
    def __init__(self, runner, use_graphs: bool | None = None):
        self.runner = runner
        self.model = runner.model
        self.device = runner.device
        self.block_size = runner.block_size
        self.decoder = FastDecoder(self.model.language_model)
        self.uses_mrope = runner.uses_mrope
        cfg = runner.config
        self.max_blocks = -(-cfg.model.max_model_len // self.block_size)
        self.max_context = self.max_blocks * self.block_size
        self.max_bs = cfg.scheduler.max_num_seqs
        if use_graphs is None:
            use_graphs = os.environ.get("MMHPC_CUDA_GRAPHS", "1") != "0"
        self.use_graphs = use_graphs
        self.sizes = graph_batch_sizes(self.max_bs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        dev, M = self.device, self.max_bs
        self.ids = torch.zeros(M, dtype=torch.long, device=dev)
        self.pos = torch.zeros((3, M) if self.uses_mrope else (M,), dtype=torch.long, device=dev)
        self.slots = torch.full((M,), -1, dtype=torch.long, device=dev)
        self.tables = torch.zeros(M, self.max_blocks, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(M, dtype=torch.int32, device=dev)
        self.logits: dict[int, torch.Tensor] = {}
        self._host_tables = np.zeros((M, self.max_blocks), dtype=np.int32)

    # ---- graphs ------------------------------------------------------------------------------

    def _decode_forward(self, n: int) -> torch.Tensor:
        pos = self.pos[:, :n] if self.uses_mrope else self.pos[:n]
        meta = GpuAttnMeta(self.slots[:n], self.tables[:n], self.lens[:n], None, 1,
                           self.max_context, decode=True)
        h = self.decoder(self.ids[:n], pos, meta, self.runner.kv_cache)
        return self.model.compute_logits(h)

    @torch.inference_mode()
    def capture(self, sizes: list[int] | None = None) -> None:
        """Capture decode graphs, largest first (they share one memory pool)."""
        if not self.use_graphs:
            return
        self.slots.fill_(-1)
        self.lens.fill_(1)                  # attend to slot 0 of block 0: harmless, finite
        self.tables.zero_()
        for n in sorted(sizes or self.sizes, reverse=True):
            if n in self.graphs:
                continue
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):          # warm up (Triton compiles, cuBLAS picks)
                    self._decode_forward(n)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.logits[n] = self._decode_forward(n)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[n] = g
        self.lens.zero_()
        torch.cuda.synchronize(self.device)

    # ---- steps -------------------------------------------------------------------------------

    def _is_decode(self, step) -> bool:
        num_seqs = len(step.context_lens)
        return (step.mm is None and len(step.input_ids) == num_seqs
                and len(step.sample_rows) == num_seqs and num_seqs <= self.max_bs)

    @torch.inference_mode()
    def run_step(self, step) -> torch.Tensor:
        if self._is_decode(step):
            return self._decode(step)
        return self._eager(step)

    def _fill_tables(self, tables: list[list[int]], lens: list[int], rows: int) -> np.ndarray:
        host = self._host_tables[:rows]
        host.fill(0)
        bs = self.block_size
        for i, (t, n) in enumerate(zip(tables, lens)):
            nb = -(-n // bs)
            host[i, :nb] = t[:nb]
        return host

    def _decode(self, step) -> torch.Tensor:
        B = len(step.context_lens)
        n = next((s for s in self.sizes if s >= B), B) if self.use_graphs else B
        ids = np.zeros(n, dtype=np.int64)
        ids[:B] = step.input_ids
        slots = np.full(n, -1, dtype=np.int64)
        slots[:B] = step.slots
        lens = np.zeros(n, dtype=np.int32)
        lens[:B] = step.context_lens
        tables = self._fill_tables(step.block_tables, step.context_lens, n)
        self.ids[:n].copy_(torch.from_numpy(ids), non_blocking=True)
        self.slots[:n].copy_(torch.from_numpy(slots), non_blocking=True)
        self.lens[:n].copy_(torch.from_numpy(lens), non_blocking=True)
        self.tables[:n].copy_(torch.from_numpy(tables), non_blocking=True)
        pos = step.positions
        if self.uses_mrope:
            self.pos[:, :B].copy_(pos, non_blocking=True)
            self.pos[:, B:n].zero_()
        else:
            self.pos[:B].copy_(pos, non_blocking=True)
            self.pos[B:n].zero_()
        g = self.graphs.get(n) if self.use_graphs else None
        if g is not None:
            g.replay()
            logits = self.logits[n]
        else:
            pos_t = self.pos[:, :n] if self.uses_mrope else self.pos[:n]
            meta = GpuAttnMeta(self.slots[:n], self.tables[:n], self.lens[:n], None, 1,
                               max(step.context_lens), decode=True)
            logits = self.model.compute_logits(
                self.decoder(self.ids[:n], pos_t, meta, self.runner.kv_cache))
        return logits[:B].float()

    def _eager(self, step) -> torch.Tensor:
        dev = self.device
        B = len(step.context_lens)
        qs = step.query_start
        max_q = max(qs[i + 1] - qs[i] for i in range(B))
        tables = torch.from_numpy(self._fill_tables(step.block_tables, step.context_lens, B).copy())
        meta = GpuAttnMeta(
            torch.tensor(step.slots, dtype=torch.long).to(dev, non_blocking=True),
            tables.to(dev, non_blocking=True),
            torch.tensor(step.context_lens, dtype=torch.int32).to(dev, non_blocking=True),
            torch.tensor(qs, dtype=torch.int32).to(dev, non_blocking=True),
            max_q, max(step.context_lens), decode=False)
        mm = None
        if step.mm is not None:
            mm = (step.mm[0].to(dev), step.mm[1].to(device=dev, dtype=self.runner.dtype))
        ids = torch.tensor(step.input_ids, dtype=torch.long).to(dev, non_blocking=True)
        h = self.decoder(ids, step.positions.to(dev, non_blocking=True), meta,
                         self.runner.kv_cache, mm)
        if not step.sample_rows:
            return h.new_empty((0, 0), dtype=torch.float32)
        rows = torch.tensor(step.sample_rows, dtype=torch.long).to(dev, non_blocking=True)
        return self.model.compute_logits(h[rows]).float()

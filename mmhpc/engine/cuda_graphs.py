"""The CUDA step: `StepInputs` → logits through `FastDecoder`, decode steps replayed from CUDA
graphs.

Decode steps (one new token per sequence, no images) of up to `max_num_seqs` rows are padded
to the next captured batch size and replayed from a graph whose inputs live in static buffers
(ids, positions, slots, block tables padded to the model's longest context, context lengths;
padding rows have slot -1 and context 0, so they write and read nothing). The host work of a
step is building five small numpy arrays and one copy each; the only sync is the sampler's.
Other steps (prefill chunks, mixed batches, images) run the same forward eagerly with the
varlen prefill kernel. `MMHPC_CUDA_GRAPHS=0` turns graphs off (eager decode kernel).

A decode step can be captured as several graphs of layer ranges (`graph_pieces`,
`MMHPC_GRAPH_PIECE_LAYERS=8`: a first piece of one layer, then 8 layers each), replayed back to
back, so the GPU starts after a short launch. Measured on an H100 (bench/RESULTS.md) it gains
nothing once decode ahead (below) hides the launch, so the default is one graph (0).

Decode ahead (`launch_ahead`, TP size 1): once the sampler has queued the argmax of decode
step N (greedy rows only), step N+1 is predicted — each row's next position, slot and context
length, its token = that argmax, on the device — and launched before the host waits for the
tokens. The host's work between steps (postprocess, scheduling, input prep) then overlaps the
GPU instead of leaving it idle. The engine's next decode step uses the result only if its
inputs are exactly the predicted ones (ids, slots, positions, lengths, block tables);
otherwise the guess is dropped and the step runs as usual. A dropped guess only wrote K/V of a
token that was not computed yet, at a slot of the row's own partly filled last block, which
the real step (or the block's next owner) writes before anything reads it.
`MMHPC_DECODE_AHEAD=0` turns it off.
"""
from __future__ import annotations

import gc
import os

import numpy as np
import torch

from mmhpc.engine.gpu_forward import FastDecoder, FreshChunks, GpuAttnMeta
from mmhpc.engine.step_inputs import StepInputs, long_tensor


def graph_pieces(num_layers: int, chunk: int | None = None) -> list[tuple[int, int]]:
    """Layer ranges of the decode graphs: [0, 1) then at most `chunk` layers each (0: one
    range of all layers). Default chunk: $MMHPC_GRAPH_PIECE_LAYERS or 0."""
    if chunk is None:
        chunk = int(os.environ.get("MMHPC_GRAPH_PIECE_LAYERS", "0"))
    if chunk <= 0 or num_layers <= 1:
        return [(0, num_layers)]
    bounds = [0, 1] + list(range(1 + chunk, num_layers, chunk)) + [num_layers]
    return list(zip(bounds[:-1], bounds[1:]))


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
        self.pieces = graph_pieces(self.decoder.num_layers)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}    # size -> its pieces, in order
        self.pool = None
        dev, M = self.device, self.max_bs
        # One packed buffer per graph size n (ids, slots, positions: int64; context lengths,
        # block tables: int32), filled on the host in a pinned twin and sent with ONE H2D copy
        # per step; the graph of size n reads the device views of its own buffer.
        self.npos = 3 if self.uses_mrope else 1
        self.bufs = {n: _StepBuffers(n, self.npos, self.max_blocks, dev)
                     for n in sorted(set(self.sizes + [M]))}
        big = self.bufs[max(self.bufs)]
        self.ids, self.pos, self.slots = big.ids, big.pos, big.slots     # eager decode, tests
        self.tables, self.lens = big.tables, big.lens
        self.logits: dict[int, torch.Tensor] = {}
        self._host_tables = np.zeros((M, self.max_blocks), dtype=np.int32)
        self._copied = torch.cuda.Event() if dev.type == "cuda" else None
        self.ahead_enabled = use_graphs and os.environ.get("MMHPC_DECODE_AHEAD", "1") != "0"
        # prefill steps: the last layer's attention + MLP on the sampled rows only
        self.prune_last = os.environ.get("MMHPC_PRUNE_LAST", "1") != "0"
        self._last = None                   # (n, step) of the last graph-replayed decode step
        self._ahead: _Ahead | None = None   # the step launched ahead, not yet claimed
        self.ahead_hits = self.ahead_misses = 0

    # ---- graphs ------------------------------------------------------------------------------

    def _decode_begin(self, n: int):
        b = self.bufs[n]
        meta = GpuAttnMeta(b.slots, b.tables, b.lens, None, 1, self.max_context, decode=True)
        return self.decoder.begin(b.ids, b.pos if self.uses_mrope else b.pos[0]), meta

    def _decode_forward(self, n: int) -> torch.Tensor:
        state, meta = self._decode_begin(n)
        self.decoder.layers(state, 0, self.decoder.num_layers, meta, self.runner.kv_cache)
        return self.decoder.logits(self.decoder.end(state), self.model).float()

    @torch.inference_mode()
    def capture(self, sizes: list[int] | None = None) -> None:
        """Capture the decode graphs (pieces of layer ranges), largest size first; all share one
        memory pool. A piece reads the state tensors (hidden, residual, rotary tables) that the
        piece before it wrote: they stay allocated, and a size's pieces always replay in order."""
        if not self.use_graphs:
            return
        # Another engine's graphs freed by the garbage collector while this one captures (an
        # engine dropped and rebuilt in one process) destroy a graph mid-capture, which
        # invalidates it ("operation not permitted when stream is capturing"): collect first,
        # and not during the capture.
        gc.collect()
        gc_on = gc.isenabled()
        gc.disable()
        try:
            self._capture(sizes)
        finally:
            if gc_on:
                gc.enable()

    def _capture(self, sizes: list[int] | None) -> None:
        for b in self.bufs.values():
            b.slots.fill_(-1)
            b.lens.fill_(1)                 # attend to slot 0 of block 0: harmless, finite
            b.tables.zero_()
        kv = self.runner.kv_cache
        for n in sorted(sizes or self.sizes, reverse=True):
            if n in self.graphs:
                continue
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):          # warm up (Triton compiles, cuBLAS picks)
                    self._decode_forward(n)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graphs, state, meta = [], None, None
            for j, (lo, hi) in enumerate(self.pieces):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    if state is None:
                        state, meta = self._decode_begin(n)
                    self.decoder.layers(state, lo, hi, meta, kv)
                    if j == len(self.pieces) - 1:
                        self.logits[n] = self.decoder.logits(self.decoder.end(state),
                                                             self.model).float()
                if self.pool is None:
                    self.pool = g.pool()
                graphs.append(g)
            self.graphs[n] = graphs
        for b in self.bufs.values():
            b.lens.zero_()
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def warm_up(self, num_tokens: int | None = None) -> None:
        """One prefill step of `num_tokens` (default: the scheduler's token budget) through the
        eager path, writing and reading no cache (padding slots, no cached prefix), then the
        vision tower on blank images filling that budget (`model.warm_up_items`): Triton
        compiles, cuBLAS picks its kernels, the allocator and the pinned staging buffer grow to
        the largest step now, at start-up, instead of inside the first real steps; a budget
        that does not fit the card fails here, before any request. (vLLM's profile run does
        the same.)"""
        cfg = self.runner.config
        T = num_tokens or cfg.scheduler.max_num_batched_tokens
        L = max(1, min(T, cfg.model.max_model_len))
        T = min(T, L * self.max_bs)                 # a step holds at most max_num_seqs chunks
        lens = [L] * (T // L) + ([T % L] if T % L else [])
        qs = [0]
        for n in lens:
            qs.append(qs[-1] + n)
        pos = torch.cat([torch.arange(n) for n in lens])
        if self.uses_mrope:
            pos = pos.expand(3, T).contiguous()
        step = StepInputs([0] * T, pos, [-1] * T, qs, lens, [[0]] * len(lens),
                          [q - 1 for q in qs[1:]])
        items = getattr(self.model, "warm_up_items", None)
        try:
            self._eager(step)
            if items is not None:       # the vision tower at a step's largest image batch
                self.runner.encode(items(T))
            torch.cuda.synchronize(self.device)
        except torch.OutOfMemoryError as e:
            raise RuntimeError(
                f"a prefill step of {T} tokens does not fit on the GPU next to the KV cache "
                f"({self.runner.num_blocks} blocks): lower scheduler.max_num_batched_tokens or "
                f"cache.gpu_memory_utilization") from e

    def replay(self, n: int) -> torch.Tensor:
        """Replay the decode step of graph size n (its pieces in order); returns its logits."""
        for g in self.graphs[n]:
            g.replay()
        return self.logits[n]

    # ---- steps -------------------------------------------------------------------------------

    def _is_decode(self, step) -> bool:
        num_seqs = len(step.context_lens)
        return (step.mm is None and len(step.input_ids) == num_seqs
                and len(step.sample_rows) == num_seqs and num_seqs <= self.max_bs)

    @torch.inference_mode()
    def run_step(self, step) -> torch.Tensor:
        ahead, self._ahead, self._last = self._ahead, None, None
        if self._is_decode(step):
            if ahead is not None:
                if ahead.matches(step, self.block_size):
                    self.ahead_hits += 1
                    self._last = (ahead.n, step)
                    return self.logits[ahead.n][:len(step.context_lens)]
                self.ahead_misses += 1
            return self._decode(step)
        return self._eager(step)

    @torch.inference_mode()
    def launch_ahead(self, tokens: torch.Tensor, tokens_host: torch.Tensor) -> bool:
        """After decode step N's argmax is queued: launch step N+1 with `tokens` (device, one
        per row) as its input ids, if every row's next token fits its allocated blocks.
        `tokens_host` (pinned) receives the same tokens; `run_step` checks them."""
        last, self._last = self._last, None
        if last is None or not self.ahead_enabled:
            return False
        n, step = last
        B = len(step.context_lens)
        if tokens.shape[0] != B:
            return False
        bs = self.block_size
        slots = []
        for t, c in zip(step.block_tables, step.context_lens):
            if c + 1 > self.max_context or c // bs >= len(t):
                return False                # the next token needs a block not allocated yet
            slots.append(t[c // bs] * bs + c % bs)
        lens = [c + 1 for c in step.context_lens]
        positions = step.positions + 1
        b = self.bufs[n]
        self._copied.synchronize()
        h = b.host
        h.slots[:B] = slots
        h.pos[:, :B] = positions.numpy().reshape(self.npos, B)
        h.lens[:B] = lens
        for i, (t, c) in enumerate(zip(step.block_tables, lens)):
            nb = -(-c // bs)
            h.tables[i, :nb] = t[:nb]
        b.send(n)
        self._copied.record()
        b.ids[:B].copy_(tokens)             # after the copy above, in stream order
        self.replay(n)
        self._ahead = _Ahead(n, slots, lens, positions, step.block_tables, tokens_host)
        return True

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
        b = self.bufs.get(n)
        if b is None:                       # eager decode of a size without a buffer
            b = self.bufs[next(s for s in sorted(self.bufs) if s >= B)]
        if self._copied is not None:
            self._copied.synchronize()      # the last step's copy has left the pinned buffer
        h = b.host
        h.ids[:B] = step.input_ids
        h.ids[B:n] = 0
        h.slots[:B] = step.slots
        h.slots[B:n] = -1
        h.pos[:, :B] = step.positions.numpy().reshape(self.npos, B)
        h.pos[:, B:n] = 0
        h.lens[:B] = step.context_lens
        h.lens[B:n] = 0
        bs = self.block_size
        for i, (t, c) in enumerate(zip(step.block_tables, step.context_lens)):
            nb = -(-c // bs)               # rows past a context are never read: no clearing
            h.tables[i, :nb] = t[:nb]
        b.send(n)
        if self._copied is not None:
            self._copied.record()
        if self.use_graphs and n in self.graphs and b.n == n:
            self._last = (n, step)
            return self.replay(n)[:B]
        pos_t = b.pos[:, :n] if self.uses_mrope else b.pos[0, :n]
        meta = GpuAttnMeta(b.slots[:n], b.tables[:n], b.lens[:n], None, 1,
                           max(step.context_lens), decode=True)
        return self.decoder.logits(
            self.decoder(b.ids[:n], pos_t, meta, self.runner.kv_cache), self.model)[:B].float()

    def _eager(self, step) -> torch.Tensor:
        dev = self.device
        B = len(step.context_lens)
        qs = step.query_start
        max_q = max(qs[i + 1] - qs[i] for i in range(B))
        tables = torch.from_numpy(self._fill_tables(step.block_tables, step.context_lens, B).copy())
        fresh = FreshChunks.of(qs, step.context_lens, dev)
        rows = seqs = None
        if self.prune_last:
            # sample rows are the last rows of their chunks: the sequence of each, by its end
            ends = {q - 1: i for i, q in enumerate(qs[1:])}
            rows = long_tensor(step.sample_rows).to(dev, non_blocking=True)
            seqs = long_tensor([ends[r] for r in step.sample_rows]).to(dev, non_blocking=True)
        meta = GpuAttnMeta(
            long_tensor(step.slots).to(dev, non_blocking=True),
            tables.to(dev, non_blocking=True),
            torch.tensor(step.context_lens, dtype=torch.int32).to(dev, non_blocking=True),
            torch.tensor(qs, dtype=torch.int32).to(dev, non_blocking=True),
            max_q, max(step.context_lens), decode=False, fresh=fresh,
            sample_rows=rows, sample_seqs=seqs)
        mm = None
        if step.mm is not None:
            mm = (step.mm[0].to(dev), step.mm[1].to(device=dev, dtype=self.runner.dtype))
        ids = long_tensor(step.input_ids).to(dev, non_blocking=True)
        h = self.decoder(ids, step.positions.to(dev, non_blocking=True), meta,
                         self.runner.kv_cache, mm)
        if not step.sample_rows:
            return h.new_empty((0, 0), dtype=torch.float32)
        if rows is None:
            h = h[long_tensor(step.sample_rows).to(dev, non_blocking=True)]
        return self.decoder.logits(h, self.model).float()


class _Ahead:
    """A decode step launched ahead: the inputs it assumed."""

    def __init__(self, n, slots, lens, positions, tables, tokens_host):
        self.n, self.slots, self.lens, self.positions = n, slots, lens, positions
        self.tables, self.tokens_host = tables, tokens_host

    def matches(self, step, block_size: int) -> bool:
        if step.slots != self.slots or step.context_lens != self.lens:
            return False
        if step.input_ids != self.tokens_host[:len(self.lens)].tolist():
            return False
        if not torch.equal(step.positions, self.positions):
            return False
        for t, mine, c in zip(step.block_tables, self.tables, self.lens):
            nb = -(-c // block_size)
            if t[:nb] != mine[:nb]:
                return False
        return True


class _HostViews:
    pass


class _StepBuffers:
    """Inputs of an n-row decode step: one device buffer and its pinned host twin, both laid out
    [ids n | slots n | positions npos*n] int64, then [lens n | tables n*max_blocks] int32."""

    def __init__(self, n: int, npos: int, max_blocks: int, device: torch.device):
        self.n = n
        w64 = (2 + npos) * n
        w32 = n + n * max_blocks
        words = w64 + (w32 + 1) // 2
        self.dev = torch.zeros(words, dtype=torch.long, device=device)
        pin = device.type == "cuda"
        self.host_t = torch.zeros(words, dtype=torch.long, pin_memory=pin)
        for obj, buf in ((self, self.dev), (_HostViews(), self.host_t)):
            obj.ids = buf[:n]
            obj.slots = buf[n:2 * n]
            obj.pos = buf[2 * n:w64].view(npos, n)
            i32 = buf[w64:].view(torch.int32)
            obj.lens = i32[:n]
            obj.tables = i32[n:w32].view(n, max_blocks)
            if buf is self.host_t:
                self.host = _HostViews()
                for k in ("ids", "slots", "pos", "lens", "tables"):
                    setattr(self.host, k, getattr(obj, k).numpy())
        self._w64, self._max_blocks = w64, max_blocks
        self.slots.fill_(-1)

    def send(self, rows: int) -> None:
        """One H2D copy of the whole buffer (tables of `rows` rows: the rest is never read)."""
        self.dev.copy_(self.host_t, non_blocking=True)

"""SchedulerOutput → flat tensors → model → logits of the seqs that sample this step.

Owns the model and the paged KV pool of this rank. A scheduled entry computes tokens
[start, start + num_new_tokens) of its seq; their KV goes to the slots of the seq's block
table, and attention covers everything cached before them (chunked prefill, prefix hits).
"""
from __future__ import annotations

import os

import torch

from mmhpc.config import Config
from mmhpc.distributed.group import get_tp
from mmhpc.engine.kv_cache import allocate_kv_cache, num_blocks_for
from mmhpc.engine.sequence import MMItem, Sequence
from mmhpc.engine.step_inputs import StepInputs, long_tensor
from mmhpc.models import load_model, resolve_dtype
from mmhpc.models.layers import AttentionMetadata


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


class ModelRunner:
    def __init__(self, config: Config, device: torch.device | str | None = None,
                 allocate_kv: bool = True):
        self.config = config
        self.tp = get_tp()          # TP instance of this rank (mmhpc.distributed); size 1: alone
        tp_rank, tp_size = self.tp.rank, self.tp.size
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.block_size = config.cache.block_size
        self.model = load_model(config.model.path, self.dtype, self.device,
                                random_weights=config.model.random_weights, seed=config.model.seed,
                                tp_rank=tp_rank, tp_size=tp_size)
        self.uses_mrope = getattr(self.model, "uses_mrope", False)
        self.num_blocks = 0
        self.kv_cache: torch.Tensor | None = None
        if allocate_kv:
            text = self.model.text_config
            self.num_blocks = self.tp.min_int(    # every rank of the instance: the same pool
                num_blocks_for(config.cache, text, self.dtype, self.device, tp_size))
            self.kv_cache = allocate_kv_cache(text, self.num_blocks, self.block_size, self.dtype,
                                              self.device, tp_size)
        self.cuda_steps = None      # CUDA: Triton kernels + decode graphs (mmhpc.engine.cuda_graphs)
        self.launch_ahead = None    # CUDA, TP 1: queue decode step N+1 before waiting for N
        if self.device.type == "cuda" and os.environ.get("MMHPC_FAST_PATH", "1") != "0" \
                and getattr(self.model, "fast_path", True):     # False: plain torch on CUDA
            from mmhpc.engine.gpu_forward import prepare_vision
            prepare_vision(self.model)
            if allocate_kv:
                from mmhpc.engine.cuda_graphs import CudaStepRunner
                self.cuda_steps = CudaStepRunner(self)
                self.cuda_steps.capture()
                self.cuda_steps.warm_up()
                if tp_size == 1:            # TP followers could not follow a step run ahead
                    self.launch_ahead = self.cuda_steps.launch_ahead

    # ---- encode ------------------------------------------------------------------------------

    def encode(self, items: list[MMItem]) -> None:
        """Vision + projector for items with pixels, one batch; embeddings stay on the items."""
        todo = [it for it in items if it.embeddings is None]
        if not todo:
            return
        if any(it.pixel_values is None for it in todo):
            raise ValueError("an image item has neither pixel values nor embeddings")
        for it, emb in zip(todo, self.model.encode(todo)):
            if emb.shape[0] != it.num_tokens:
                raise ValueError(f"image {it.content_hash[:12]}: {emb.shape[0]} embeddings for "
                                 f"{it.num_tokens} placeholder tokens")
            it.embeddings = emb

    def mrope_positions(self, token_ids: list[int], mm_items: list[MMItem]):
        grids = [it.grid_thw for it in sorted(mm_items, key=lambda it: it.offset)]
        return self.model.mrope_positions(token_ids, grids)

    # ---- prefill / decode --------------------------------------------------------------------

    def _add_positions(self, pos: list, seq: Sequence, start: int, end: int) -> None:
        """Append the positions of tokens [start, end) to pos: [T] ints, or [3][T] (M-RoPE)."""
        if not self.uses_mrope:
            pos.extend(range(start, end))
            return
        mid = start                                      # [start, mid): precomputed t/h/w
        if seq.mrope_positions is not None:
            mid = min(max(start, seq.num_prompt_tokens), end)
        if mid > start:
            for row, vals in zip(pos, seq.mrope_positions[:, start:mid].tolist()):
                row.extend(vals)
        gen = range(mid + seq.mrope_delta, end + seq.mrope_delta)   # generated/text: t = h = w
        for row in pos:
            row.extend(gen)

    @torch.inference_mode()
    def execute(self, scheduled) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step's `ScheduledSeq`s; returns (logits [N, V] float32, the N seqs to sample)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list = [[], [], []] if self.uses_mrope else []   # [3][T] or [T]
        slots, mm_rows, mm_vals = [], [], []
        query_start, context_lens, tables = [0], [], []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        for s in scheduled:
            seq, start = s.seq, s.start
            end = start + s.num_new_tokens
            base = len(input_ids)
            input_ids.extend(seq.token_slice(start, end))
            self._add_positions(positions, seq, start, end)
            table = seq.block_table
            p = start
            while p < end:                               # slots, one run per KV block
                b = p // bs
                e = min(end, (b + 1) * bs)
                first = table[b] * bs - b * bs
                slots.extend(range(first + p, first + e))
                p = e
            for it in seq.mm_items:                      # placeholder rows inside this chunk
                lo, hi = max(start, it.offset), min(end, it.offset + it.num_tokens)
                if lo < hi:
                    mm_rows.append(torch.arange(lo - start + base, hi - start + base))
                    mm_vals.append(it.embeddings[lo - it.offset:hi - it.offset])
            query_start.append(len(input_ids))
            context_lens.append(end)
            tables.append(table)
            if s.sample:
                sample_rows.append(len(input_ids) - 1)
                sample_seqs.append(seq)
        step = StepInputs(input_ids, long_tensor(positions), slots, query_start,
                          context_lens, tables, sample_rows,
                          (torch.cat(mm_rows), torch.cat(mm_vals)) if mm_rows else None)
        self.tp.broadcast_object(step)   # TP followers run it too (mmhpc.engine.tp_worker)
        return self.run_step(step), sample_seqs

    @torch.inference_mode()
    def run_step(self, step: StepInputs) -> torch.Tensor:
        """The model on one step's flat inputs; logits [N, V] float32 of the sampled rows."""
        if self.cuda_steps is not None:
            return self.cuda_steps.run_step(step)
        dev = self.device
        meta = AttentionMetadata(long_tensor(step.slots).to(dev),
                                 step.query_start, step.context_lens, step.block_tables,
                                 self.block_size)
        mm = None
        if step.mm is not None:
            mm = (step.mm[0].to(dev), step.mm[1].to(device=dev, dtype=self.dtype))
        hidden = self.model(long_tensor(step.input_ids).to(dev),
                            step.positions.to(dev), meta, self.kv_cache, mm)
        if not step.sample_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        logits = self.model.compute_logits(hidden[torch.tensor(step.sample_rows, device=dev)])
        return logits.float()


"""The CUDA forward of the decoder and the vision towers, over the same parameters as the
plain-torch modules (`mmhpc.models.layers`), so checkpoints, the loader and the CPU path are
untouched.

Decoder: q/k/v and gate/up weights are concatenated once (the module's own weights become views
of the fused tensor, so no memory is duplicated); per layer one fused RMSNorm(+residual), one
qkv GEMM, rotary in place, `write_kv`, paged attention reading the KV blocks in place (decode:
split-K kernel; prefill: varlen causal kernel, FlashAttention-2 for the trailing chunks with no
cached prefix), o_proj, fused RMSNorm, one gate_up GEMM, SiLU-and-mul, down_proj. Qwen3: an
RMSNorm over each q/k head before rotary; MoE layers: `models.moe` (grouped GEMMs, no sync);
DeepStack rows added after the first layers. A prefill step's last layer runs attention and
the MLP on the sampled rows alone. No host sync inside:
the caller passes host bounds (`max_seqlen_q`, `max_context_len`), so a decode step can be
captured in a CUDA graph.

Vision: CLIP / Qwen2-VL ViT blocks run with one qkv GEMM, flash/cuDNN SDPA, in-place rotary
and quick-GELU, the attention residual add fused into the second LayerNorm (which also
pre-adds fc2's bias) and fc2 accumulating into the residual in place; the CLIP tower stops at
the deepest layer LLaVA reads. Qwen2.5-VL's blocks: the same attention (its windows through
FlashAttention's varlen kernel), RMSNorms with the residual add fused, one gate_up GEMM.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmhpc import kernels
from mmhpc.models.layers import split_mm_embeds


log = logging.getLogger(__name__)
MOE_DECODE_ROWS = 4        # tokens up to which a MoE layer may take kernels.moe_decode


@dataclass
class GpuAttnMeta:
    slot_mapping: torch.Tensor      # [T] long, -1 = padding (no write)
    block_tables: torch.Tensor      # [B, max_blocks] int32
    context_lens: torch.Tensor      # [B] int32, keys incl. this step's (0 = padding row)
    cu_seqlens_q: torch.Tensor | None   # [B+1] int32 (prefill); None for decode
    max_seqlen_q: int
    max_context_len: int
    decode: bool                    # one query per row: the split-K decode kernel
    fresh: "FreshChunks | None" = None   # prefill: the trailing chunks FlashAttention takes
    # prefill: the rows [R] (long) whose hidden states the step needs (the sampled ones) and
    # their sequences [R]; the last layer runs attention and the MLP on those rows alone (its
    # KV is still written for every token). None: every row.
    sample_rows: torch.Tensor | None = None
    sample_seqs: torch.Tensor | None = None


@dataclass
class FreshChunks:
    """A prefill step's trailing chunks with nothing cached before them (new prompts, after the
    decode rows and continued chunks the scheduler puts first): FlashAttention-2 varlen runs
    these, the paged kernel the rows before them."""
    seq: int                        # the first such sequence
    row: int                        # its first row
    cu_seqlens: torch.Tensor        # [B - seq + 1] int32, from 0
    max_seqlen: int
    head_max_seqlen: int            # longest chunk before `seq` (0: none)

    @staticmethod
    def of(query_start: list[int], context_lens: list[int], device) -> "FreshChunks | None":
        B = len(context_lens)
        s0 = B
        while s0 > 0 and query_start[s0] - query_start[s0 - 1] == context_lens[s0 - 1]:
            s0 -= 1
        if s0 == B:
            return None
        r0 = query_start[s0]
        lens = [query_start[i + 1] - query_start[i] for i in range(B)]
        cu = torch.tensor([q - r0 for q in query_start[s0:]], dtype=torch.int32)
        return FreshChunks(s0, r0, cu.to(device, non_blocking=True), max(lens[s0:]),
                           max(lens[:s0], default=0))


def _fuse_rows(mods) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of Linear modules along dim 0; the modules keep
    views into the fused tensors."""
    w = torch.cat([m.weight.data for m in mods])
    b = torch.cat([m.bias.data for m in mods]) if mods[0].bias is not None else None
    start = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight.data = w[start:start + n]
        if b is not None:
            m.bias.data = b[start:start + n]
        start += n
    return w, b


class FastDecoder:
    """Runs `model.language_model` (a `layers.Decoder`) with the Triton kernels."""

    def __init__(self, decoder):
        self.dec = decoder
        self.fused = []
        for layer in decoder.layers:
            a, m = layer.self_attn, layer.mlp
            moe = hasattr(m, "experts")                      # gu_w None: the MoE path
            if not moe and m.act is not F.silu:
                raise ValueError("FastDecoder: only SiLU-gated MLPs")
            qkv_w, qkv_b = _fuse_rows([a.q_proj, a.k_proj, a.v_proj])
            gu_w = None if moe else _fuse_rows([m.gate_proj, m.up_proj])[0]
            self.fused.append((qkv_w, qkv_b, gu_w))
        a0 = decoder.layers[0].self_attn
        self.q_size = a0.q_proj.weight.shape[0]
        self.kv_size = a0.k_proj.weight.shape[0]
        self.head_dim = a0.head_dim
        self.num_heads = self.q_size // self.head_dim
        self.num_kv_heads = self.kv_size // self.head_dim
        self.scale = a0.scale
        self.qk_norm = getattr(a0, "qk_norm", False)
        self.qk_kernel = False
        # one-row steps (batch-1 decode) take the Triton GEMV; TP ranks keep the modules' own
        # GEMM + collective
        from mmhpc.distributed.group import get_tp
        self.gemv = get_tp().size == 1 and os.environ.get("MMHPC_GEMV", "1") != "0"
        self.gemv_silu = os.environ.get("MMHPC_GEMV_SILU", "1") != "0"   # SiLU-mul in the GEMV
        self.moe_decode = os.environ.get("MMHPC_MOE_DECODE", "0") == "1"   # see _moe
        self.qk_kernel = self._qk_kernel_ok()                              # see _qk_norm

    def _qk_norm(self, qkv: torch.Tensor, attn, T: int) -> None:
        """Qwen3's RMSNorm over each q and k head of qkv [T, (Hq + 2 Hkv) D], in place: one
        Triton launch (`fused.qk_norm_`) where it passed its start-up check, else two norms."""
        D, Hq, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        qk = qkv[:, :self.q_size + self.kv_size].view(T, Hq + Hkv, D)
        if self.qk_kernel:
            from mmhpc.kernels.fused import qk_norm_
            qk_norm_(qk, Hq, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps)
            return
        qk[:, :Hq] = kernels.rms_norm(qk[:, :Hq].reshape(T * Hq, D), attn.q_norm.weight,
                                      attn.q_norm.eps).view(T, Hq, D)
        qk[:, Hq:] = kernels.rms_norm(qk[:, Hq:].reshape(T * Hkv, D), attn.k_norm.weight,
                                      attn.k_norm.eps).view(T, Hkv, D)

    def _qk_kernel_ok(self) -> bool:
        """Whether `fused.qk_norm_` runs here and equals the two-norm path (checked once on
        random heads; a failure logs why and keeps the two norms). MMHPC_QK_NORM_KERNEL=0: off."""
        attn = self.dec.layers[0].self_attn
        w = attn.q_proj.weight
        if not (self.qk_norm and w.is_cuda and kernels.HAS_TRITON
                and os.environ.get("MMHPC_QK_NORM_KERNEL", "1") != "0"):
            return False
        try:
            from mmhpc.kernels.fused import qk_norm_
            T, D, Hq = 3, self.head_dim, self.num_heads
            qkv = torch.randn(T, self.q_size + 2 * self.kv_size, device=w.device, dtype=w.dtype)
            want = qkv.clone()
            self.qk_kernel = False
            self._qk_norm(want, attn, T)
            got = qkv.clone()
            qk_norm_(got[:, :self.q_size + self.kv_size].view(T, -1, D), Hq, attn.q_norm.weight,
                     attn.k_norm.weight, attn.q_norm.eps)
            ok = torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
            if not ok:
                log.warning("qk_norm_ differs from the two-norm path: not used")
            return ok
        except Exception as e:  # noqa: BLE001 - a kernel that cannot build here
            log.warning("qk_norm_ unavailable (%s: %s): two norms instead", type(e).__name__, e)
            return False

    def _moe(self, moe, x: torch.Tensor) -> torch.Tensor:
        """A MoE layer: at decode sizes (<= MOE_DECODE_ROWS tokens, one rank holding every
        expert, MMHPC_MOE_DECODE=1) route here and run the experts as two GEMV-style kernels
        (`kernels.moe_decode`); else the layer itself (sorted pairs, grouped GEMMs)."""
        if not (self.moe_decode and x.shape[0] <= MOE_DECODE_ROWS and moe.tp.size == 1
                and moe.shared_expert is None and not moe.spec.weight_on_input):
            return moe(x)
        from mmhpc.kernels.moe_decode import moe_decode
        from mmhpc.models.moe import route
        weights, ids = route(moe.router_logits(x), moe.spec)                # [T, k] each
        flat = ids.flatten()
        moe.tokens_per_expert.index_add_(0, flat, torch.ones_like(flat))    # /metrics' counts
        return moe_decode(x, moe.experts.gate_up_proj, moe.experts.down_proj, ids, weights)

    def _linear(self, x, w, b=None):
        return kernels.linear(x, w, b) if self.gemv else F.linear(x, w, b)

    def _proj(self, x, module):
        return kernels.linear(x, module.weight, module.bias) if self.gemv else module(x)

    def logits(self, h: torch.Tensor, model) -> torch.Tensor:
        """model.compute_logits(h), the lm_head by the GEMV when one row."""
        return self._proj(h, model.lm_head) if self.gemv else model.compute_logits(h)

    @property
    def num_layers(self) -> int:
        return len(self.dec.layers)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: GpuAttnMeta,
                 kv_cache: torch.Tensor, mm_embeds=None) -> torch.Tensor:
        state = self.begin(input_ids, positions, mm_embeds)
        self.layers(state, 0, self.num_layers, meta, kv_cache)
        return self.end(state)

    # The forward in three stages over a `state` dict (h, residual, cos, sin), so a decode step
    # can be captured as several CUDA graphs of layer ranges (mmhpc.engine.cuda_graphs).

    def begin(self, input_ids: torch.Tensor, positions: torch.Tensor, mm_embeds=None) -> dict:
        dec = self.dec
        h = dec.embed_tokens(input_ids)                               # [T, hidden]
        rows, deep = split_mm_embeds(h, mm_embeds)                    # deep: [R, L, hidden]
        cos, sin = dec.rotary(positions, h.dtype)                     # [T, D]
        return {"h": h, "residual": None, "cos": cos, "sin": sin, "rows": rows, "deep": deep}

    def layers(self, state: dict, lo: int, hi: int, meta: GpuAttnMeta,
               kv_cache: torch.Tensor) -> dict:
        """Decoder layers [lo, hi) on `state`, updated in place (and returned)."""
        h, residual, cos, sin = state["h"], state["residual"], state["cos"], state["sin"]
        deep = state.get("deep")
        T = h.shape[0]
        D, Hq, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        qk = self.q_size + self.kv_size
        for i in range(lo, hi):
            layer = self.dec.layers[i]
            qkv_w, qkv_b, gu_w = self.fused[i]
            ln = layer.input_layernorm
            if residual is None:
                x, residual = kernels.rms_norm(h, ln.weight, ln.eps), h
            else:
                x, residual = kernels.rms_norm(h, ln.weight, ln.eps, residual)
            qkv = self._linear(x, qkv_w, qkv_b)                       # [T, (Hq + 2 Hkv) D]
            q = qkv[:, :self.q_size].view(T, Hq, D)
            k = qkv[:, self.q_size:qk].view(T, Hkv, D)
            v = qkv[:, qk:].view(T, Hkv, D)
            if self.qk_norm:                                          # per head, before rotary
                self._qk_norm(qkv, layer.self_attn, T)
            cache = kv_cache[i]
            # rotary on q and k in place, k and v into their cache slots: one kernel (in the qkv
            # GEMV's epilogue it was slower: bench/RESULTS.md)
            kernels.rotary_write_kv(qkv[:, :qk].view(T, Hq + Hkv, D), Hq, v, cos, sin, cache,
                                    meta.slot_mapping)
            if i == self.num_layers - 1 and meta.sample_rows is not None and not meta.decode:
                # the last layer's outputs are read at the sampled rows only: their queries
                # attend over the cache (this chunk's keys were just written), one row each
                rows, seqs = meta.sample_rows, meta.sample_seqs
                T = rows.shape[0]
                residual = residual[rows]
                if T == 0:
                    h = residual
                    break
                o = kernels.paged_decode_attention(q[rows], cache, meta.block_tables[seqs],
                                                   meta.context_lens[seqs], self.scale,
                                                   max_context_len=meta.max_context_len)
            elif meta.decode:
                o = kernels.paged_decode_attention(q, cache, meta.block_tables, meta.context_lens,
                                                   self.scale, max_context_len=meta.max_context_len)
            else:
                o = self._prefill_attention(q, k, v, meta, cache)
            h = self._proj(o.view(T, Hq * D), layer.self_attn.o_proj)
            ln = layer.post_attention_layernorm
            x, residual = kernels.rms_norm(h, ln.weight, ln.eps, residual)
            if gu_w is None:                                         # models.moe.MoE
                h = self._moe(layer.mlp, x)
            elif self.gemv and self.gemv_silu:                       # one launch at one row
                h = self._proj(kernels.linear_silu_and_mul(x, gu_w), layer.mlp.down_proj)
            else:
                h = self._proj(kernels.silu_and_mul(F.linear(x, gu_w)), layer.mlp.down_proj)
            if deep is not None and i < deep.shape[1] and h.shape[0] == state["h"].shape[0]:
                h.index_add_(0, state["rows"], deep[:, i])            # DeepStack level i
        state["h"], state["residual"] = h, residual
        return state

    def _prefill_attention(self, q, k, v, meta: GpuAttnMeta, cache) -> torch.Tensor:
        fr = meta.fresh
        if fr is not None:
            r0, s0 = fr.row, fr.seq
            tail = kernels.fresh_prefill_attention(q[r0:], k[r0:], v[r0:], fr.cu_seqlens,
                                                   fr.max_seqlen, self.scale)
            if tail is not None:
                if r0 == 0:
                    return tail
                o = q.new_empty(q.shape)
                o[r0:] = tail
                kernels.paged_prefill_attention(
                    q[:r0], k[:r0], v[:r0], meta.cu_seqlens_q[:s0 + 1], cache,
                    meta.block_tables[:s0], meta.context_lens[:s0], self.scale,
                    max_seqlen_q=fr.head_max_seqlen, out=o[:r0])
                return o
        return kernels.paged_prefill_attention(q, k, v, meta.cu_seqlens_q, cache,
                                               meta.block_tables, meta.context_lens, self.scale,
                                               max_seqlen_q=meta.max_seqlen_q)

    def end(self, state: dict) -> torch.Tensor:
        dec = self.dec
        if state["h"].shape[0] == 0:                  # a prefill step that samples no row
            return state["h"]
        if state["residual"] is None:
            return kernels.rms_norm(state["h"], dec.norm.weight, dec.norm.eps)
        h, _ = kernels.rms_norm(state["h"], dec.norm.weight, dec.norm.eps, state["residual"])
        return h


# ---- vision --------------------------------------------------------------------------------

# cuDNN's attention is the fastest here for the ViTs (head_dim 64 / 80; bench/RESULTS.md) but
# builds a plan per new shape, ~45 ms of host time on an H100, while flash needs none. With
# `MMHPC_VIT_SDPA=auto` (default) a shape runs on flash until it has recurred often enough to
# repay a plan (a fixed batch size, a common image size), or at once when one call is large
# (a ~1080p Qwen2-VL image: ~0.6 TFLOP a layer, cuDNN saves ~25 ms an image). The offline
# bench's in-step CLIP batches (~26 images, each size recurring ~10 times) paid plans at
# 100 calls: 9.82 vs 9.67 s with flash only (bench/RESULTS.md), hence 1000.
_CUDNN_AFTER_CALLS = 1000                # ~40 batches of the same shape (23-32 layers each)
_CUDNN_AT_FLOPS = 2e11
_shape_calls: dict[tuple, int] = {}


def _sdpa_backends(q):
    from torch.nn.attention import SDPBackend
    choice = os.environ.get("MMHPC_VIT_SDPA", "auto")
    if choice == "auto":
        B, H, S, D = q.shape
        key = (B, H, S, D, q.dtype)
        n = _shape_calls[key] = _shape_calls.get(key, 0) + 1
        choice = "cudnn" if n > _CUDNN_AFTER_CALLS or 4 * B * H * S * S * D >= _CUDNN_AT_FLOPS \
            else "flash"
    order = {"cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                       SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
             "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                       SDPBackend.MATH]}.get(choice)
    return order


def _sdpa(q, k, v, scale):
    """q, k, v: [B, H, S, D]."""
    order = _sdpa_backends(q)
    if order is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _mlp_tail(attn_out, residual, norm, fc1, fc2, act):
    """h = residual + attn_out; return h + fc2(act(fc1(norm(h)))) with the add fused into the
    LayerNorm, fc2's bias pre-added there and fc2 accumulating into the residual (addmm_)."""
    from mmhpc.kernels.fused import add_layer_norm
    x, h = add_layer_norm(attn_out, residual, norm.weight, norm.bias, norm.eps, fc2.bias)
    return h.addmm_(act(fc1(x)), fc2.weight.t())


def _clip_layer_forward(layer, returns_tuple: bool):
    from mmhpc.kernels.fused import quick_gelu_
    attn, mlp = layer.self_attn, layer.mlp
    qkv_w, qkv_b = _fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj])
    heads, head_dim = attn.num_heads, attn.head_dim
    quick = getattr(getattr(mlp, "config", None), "hidden_act", "") == "quick_gelu"
    act = quick_gelu_ if quick else mlp.activation_fn

    def forward(hidden_states, *args, **kwargs):
        B, S, C = hidden_states.shape
        hidden_states = hidden_states.contiguous()
        x = layer.layer_norm1(hidden_states)
        qkv = F.linear(x, qkv_w, qkv_b).view(B, S, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        o = _sdpa(qkv[0], qkv[1], qkv[2], attn.scale)                # [B, H, S, D]
        o = attn.out_proj(o.transpose(1, 2).reshape(B * S, C))
        h = _mlp_tail(o, hidden_states.view(B * S, C), layer.layer_norm2, mlp.fc1, mlp.fc2, act)
        h = h.view(B, S, C)
        return (h,) if returns_tuple else h
    return forward


def _vision_attention(x, attn, cu_seqlens, rotary_pos_emb, position_embeddings,
                      cache: dict) -> torch.Tensor:
    """A Qwen ViT block's attention on its normed input x [N, C]: one qkv GEMM, rotary in
    place on the q and k heads, attention within each segment of `cu_seqlens` (images; for
    Qwen2.5-VL, windows in most blocks), proj -> [N, C]. Equal segments run as one SDPA
    (flash or cuDNN), unequal ones through FlashAttention's varlen kernel, else one SDPA each."""
    N, C = x.shape
    heads = attn.num_heads
    head_dim = C // heads
    scale = getattr(attn, "scaling", None) or head_dim ** -0.5
    if position_embeddings is None:
        emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
        position_embeddings = (emb.cos(), emb.sin())
    cos, sin = (t.contiguous() for t in position_embeddings)      # [N, D]
    lens, cu32, max_len = _segments(cache, cu_seqlens)
    qkv = attn.qkv(x)                                               # [N, 3C]
    _rotary_inplace(qkv[:, :2 * C].view(N, 2 * heads, head_dim), cos, sin)
    qkv = qkv.view(N, 3, heads, head_dim)
    if len(set(lens)) == 1:
        n = len(lens)
        q, k, v = qkv.view(n, N // n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        o = _sdpa(q, k, v, scale).transpose(1, 2).reshape(N, C)
    else:
        o = kernels.varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu32, max_len, scale,
                                     causal=False)                   # [N, H, D] or None
        if o is not None:
            o = o.reshape(N, C)
        else:
            outs = []
            for part in qkv.split(lens):
                q, k, v = part.permute(1, 2, 0, 3)[:, None]          # [1, H, L, D]
                outs.append(_sdpa(q, k, v, scale)[0].transpose(0, 1).reshape(-1, C))
            o = torch.cat(outs)
    return attn.proj(o)


def _segments(cache: dict, cu_seqlens: torch.Tensor) -> tuple[list[int], torch.Tensor, int]:
    """(lengths, int32 cu_seqlens, longest) of a ViT call's segments; one host sync per
    cu_seqlens tensor (Qwen2.5-VL alternates two in a call: windows and whole images)."""
    for cu, seg in cache.get("segs", ()):
        if cu is cu_seqlens:
            return seg
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    seg = (lens, cu_seqlens.to(torch.int32), max(lens))
    cache["segs"] = cache.get("segs", [])[-1:] + [(cu_seqlens, seg)]
    return seg


def _rotary_inplace(x, cos, sin) -> None:
    """x [T, H, D] rotated in place: the Triton kernel on CUDA, plain torch elsewhere."""
    if x.is_cuda and kernels.HAS_TRITON:
        from mmhpc.kernels.fused import rotary_
        rotary_(x, cos, sin)
    else:
        from mmhpc.models.layers import apply_rotary
        x.copy_(apply_rotary(x.float(), cos.float(), sin.float()))


def _qwen_block_forward(block, cache: dict):
    from mmhpc.kernels.fused import quick_gelu_
    attn, mlp = block.attn, block.mlp
    fc1, fc2 = (mlp.fc1, mlp.fc2) if hasattr(mlp, "fc1") else (mlp.linear_fc1, mlp.linear_fc2)
    act = getattr(mlp, "act", None) or mlp.act_fn                  # Qwen2-VL / Qwen3-VL names
    act = quick_gelu_ if act.__class__.__name__ in ("QuickGELUActivation",) else act

    def forward(hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None,
                **kwargs):
        hidden_states = hidden_states.contiguous()
        o = _vision_attention(block.norm1(hidden_states), attn, cu_seqlens, rotary_pos_emb,
                              position_embeddings, cache)
        return _mlp_tail(o, hidden_states, block.norm2, fc1, fc2, act)
    return forward


def _qwen2_5_block_forward(block, cache: dict):
    """Qwen2.5-VL's ViT block: RMSNorm, attention (windows or the whole image), RMSNorm with
    the residual add fused, one gate_up GEMM (biases), SiLU-and-mul, down_proj accumulating
    into the residual (its bias added to the residual first)."""
    attn, mlp, n1, n2 = block.attn, block.mlp, block.norm1, block.norm2
    gate_up_w, gate_up_b = _fuse_rows([mlp.gate_proj, mlp.up_proj])
    down = mlp.down_proj

    def forward(hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None,
                **kwargs):
        hidden_states = hidden_states.contiguous()                  # [N, C]
        x = kernels.rms_norm(hidden_states, n1.weight, n1.variance_epsilon)
        o = _vision_attention(x, attn, cu_seqlens, rotary_pos_emb, position_embeddings, cache)
        x, h = kernels.rms_norm(o, n2.weight, n2.variance_epsilon, hidden_states)
        a = kernels.silu_and_mul(F.linear(x, gate_up_w, gate_up_b))   # [N, I]
        if down.bias is not None:
            h.add_(down.bias)
        return h.addmm_(a, down.weight.t())
    return forward


def prepare_vision(model) -> None:
    """Swap the vision blocks' forwards for the fused ones (parameters unchanged)."""
    tower = getattr(model, "vision_tower", None)
    if tower is not None:
        vm = getattr(tower, "vision_model", tower)
        layers = vm.encoder.layers
        total = len(layers) + 1
        wanted = model.config.vision_feature_layer
        wanted = [wanted] if isinstance(wanted, int) else list(wanted)
        keep = max(i % total for i in wanted)
        del layers[keep:]                               # LLaVA never reads the deeper layers
        ln = layers[0].layer_norm1
        x = torch.zeros(1, 2, ln.normalized_shape[0], device=ln.weight.device, dtype=ln.weight.dtype)
        with torch.no_grad():
            try:
                probe = layers[0](x, None)
            except TypeError:                           # older HF: causal_attention_mask too
                probe = layers[0](x, None, None)
        for layer in layers:
            layer.forward = _clip_layer_forward(layer, isinstance(probe, tuple))
    visual = getattr(model, "visual", None)
    if visual is not None:
        _patch_embed_as_matmul(visual.patch_embed)
        cache: dict = {}
        for block in visual.blocks:
            swiglu = hasattr(block.mlp, "gate_proj")                # Qwen2.5-VL
            block.forward = (_qwen2_5_block_forward if swiglu else _qwen_block_forward)(block, cache)


def _patch_embed_as_matmul(pe) -> None:
    """Qwen2-VL's patch embedding is a Conv3d whose kernel equals its stride over a patch that
    arrives already flattened: one GEMM with the weight viewed [C_out, C_in*T*P*P]. (cuDNN ran
    it as a generic implicit-GEMM convolution: 1.4 ms for a 1080p image on an H100.)"""
    proj = getattr(pe, "proj", None)
    if not isinstance(proj, torch.nn.Conv3d) or tuple(proj.kernel_size) != tuple(proj.stride) \
            or any(proj.padding) or proj.groups != 1:
        return
    w = proj.weight.view(proj.out_channels, -1)
    b = proj.bias

    def forward(hidden_states):
        return F.linear(hidden_states.reshape(-1, w.shape[1]).to(w.dtype), w, b)
    pe.forward = forward

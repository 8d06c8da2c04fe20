"""Decoder building blocks in plain torch: RMSNorm, rotary (1-D and M-RoPE, sectioned or
interleaved), paged attention, and the Llama/Qwen2/Qwen3 decoder the families share (they
differ in q/k/v bias, QK-norm, rope, the MLP of a layer and DeepStack inputs).

Paged KV cache per rank: `[num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim]`.
A token's slot is `block_id * block_size + offset`; the runner computes the slots.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from mmhpc.distributed.group import get_tp
from mmhpc.distributed.parallel import (ColumnParallelLinear, RowParallelLinear,
                                        VocabParallelEmbedding)


def cat_to_device(tensors: list[torch.Tensor], device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """torch.cat(tensors).to(device, dtype). Host tensors bound for a GPU go through one pinned
    buffer and an asynchronous copy, so the host goes on launching work while the pixels
    travel (a pageable copy would first wait for the GPU to drain: idle GPU time)."""
    device = torch.device(device)
    if device.type != "cuda" or any(t.device.type != "cpu" for t in tensors):
        return torch.cat([t.to(device) for t in tensors]).to(dtype)
    shape = (sum(t.shape[0] for t in tensors),) + tuple(tensors[0].shape[1:])
    buf = torch.empty(shape, dtype=tensors[0].dtype, pin_memory=True)
    torch.cat(tensors, out=buf)
    return buf.to(device, non_blocking=True).to(dtype)


@dataclass
class AttentionMetadata:
    """How the flat batch of T tokens splits into sequences and where their KV lives."""
    slot_mapping: torch.Tensor        # [T] long: cache slot of each new token
    query_start_loc: list[int]        # [B + 1]: seq i's tokens are [start[i], start[i+1])
    context_lens: list[int]           # [B]: KV length of seq i after this step (cached + new)
    block_tables: list[list[int]]     # [B][num_blocks_i]
    block_size: int

    # Built once per step (on first use), shared by every layer.
    @cached_property
    def slot_blocks_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slot_mapping // self.block_size, self.slot_mapping % self.block_size  # [T], [T]

    @cached_property
    def groups(self) -> tuple[list["AttentionGroup"], list[int]]:
        """Batched SDPA groups (decodes; prefill chunks when padding them to the longest costs
        at most 2x) and the sequences left to the per-sequence loop."""
        qs = self.query_start_loc
        q_lens = [qs[i + 1] - qs[i] for i in range(len(self.context_lens))]
        decodes = [i for i, n in enumerate(q_lens) if n == 1]
        prefills = [i for i, n in enumerate(q_lens) if n > 1]
        groups = [AttentionGroup.build(self, decodes)] if decodes else []
        if len(prefills) > 1 and len(prefills) * max(q_lens) <= 2 * sum(q_lens[i] for i in prefills):
            groups.append(AttentionGroup.build(self, prefills))
            prefills = []
        return groups, prefills


@dataclass
class AttentionGroup:
    """Sequences of one step run as one SDPA: queries padded to `max_q`, KV to `num_blocks`."""
    num_seqs: int
    max_q: int
    tok_rows: torch.Tensor    # [N] long: rows of the group's tokens in the step
    pad_rows: torch.Tensor    # [N] long: the same tokens in the padded [num_seqs * max_q] layout
    blocks: torch.Tensor      # [num_seqs, num_blocks] long: block tables, padded with block 0
    mask: torch.Tensor        # [num_seqs, 1, max_q, num_blocks * bs] bool: query j sees key k
                              # iff k <= ctx - q_len + j (causal, and nothing past ctx)
    qpos: torch.Tensor        # [num_seqs, max_q] long: each query's position
    chunk_masks: dict = field(default_factory=dict)   # chunk size -> (blocks, mask): `window`

    @staticmethod
    def build(meta: AttentionMetadata, seqs: list[int]) -> "AttentionGroup":
        qs, bs, dev = meta.query_start_loc, meta.block_size, meta.slot_mapping.device
        q_lens = [qs[i + 1] - qs[i] for i in seqs]
        max_q, num_blocks = max(q_lens), -(-max(meta.context_lens[i] for i in seqs) // bs)
        tables = [meta.block_tables[i][:num_blocks] for i in seqs]
        tok_rows = [r for i in seqs for r in range(qs[i], qs[i + 1])]
        pad_rows = [b * max_q + j for b, n in enumerate(q_lens) for j in range(n)]
        first = torch.tensor([meta.context_lens[i] - n for i, n in zip(seqs, q_lens)], device=dev)
        last_key = first[:, None] + torch.arange(max_q, device=dev)               # [B, max_q]
        keys = torch.arange(num_blocks * bs, device=dev)
        return AttentionGroup(
            len(seqs), max_q, torch.tensor(tok_rows, device=dev), torch.tensor(pad_rows, device=dev),
            torch.tensor([t + [0] * (num_blocks - len(t)) for t in tables], device=dev),
            (keys <= last_key[:, :, None])[:, None], last_key)

    def window(self, chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(blocks [B, nb'], mask [B, 1, max_q, nb' * bs]) to read: with `chunk` (Llama-4's
        local attention, key k visible iff k // chunk == pos // chunk) each sequence's blocks
        start at its first query's chunk, so blocks before it are not read; built once a step."""
        if chunk is None:
            return self.blocks, self.mask
        if chunk not in self.chunk_masks:
            bs = self.mask.shape[-1] // self.blocks.shape[1]
            first = self.qpos[:, 0] // chunk * chunk // bs                          # [B] block
            width = int((self.blocks.shape[1] - first).max())
            cols = (first[:, None] + torch.arange(width, device=first.device)).clamp(
                max=self.blocks.shape[1] - 1)                                       # [B, nb']
            keys = first[:, None] * bs + torch.arange(width * bs, device=first.device)  # [B, L']
            start = self.qpos // chunk * chunk                                      # [B, q]
            mask = (keys[:, None] <= self.qpos[:, :, None]) & (keys[:, None] >= start[:, :, None])
            self.chunk_masks[chunk] = (self.blocks.gather(1, cols), mask[:, None])
        return self.chunk_masks[chunk]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_params(text_config) -> dict:
    """rope_parameters (HF >= 5) or rope_scaling + rope_theta (older configs)."""
    params = dict(getattr(text_config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(text_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(text_config, "rope_theta", 10000.0))
    params.setdefault("rope_theta", 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = "default" if kind == "mrope" else kind
    return params


class RotaryEmbedding(nn.Module):
    """cos/sin for positions [T] (1-D) or [3, T] (M-RoPE with `mrope_section`)."""

    def __init__(self, text_config, head_dim: int):
        super().__init__()
        params = rope_params(text_config)
        self.mrope_section = params.get("mrope_section")
        self.mrope_interleaved = bool(params.get("mrope_interleaved"))     # Qwen3-VL
        if params["rope_type"] == "default":
            theta = params["rope_theta"]
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
            self.attention_scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](text_config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(device=positions.device, dtype=torch.float32)
        freqs = positions[..., None].float() * inv_freq          # [T, D/2] or [3, T, D/2]
        if positions.dim() == 2 and self.mrope_interleaved:       # t h w t h w ... t t
            freqs = mrope_interleave(freqs, self.mrope_section)
        elif positions.dim() == 2:                                 # M-RoPE: t/h/w sections
            chunks = freqs.split(self.mrope_section, dim=-1)
            freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)                    # [T, D]
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def mrope_interleave(freqs: torch.Tensor, section: list[int]) -> torch.Tensor:
    """Qwen3-VL's interleaved M-RoPE: frequency j takes axis h where j % 3 == 1 and
    j < 3 * section[1], axis w where j % 3 == 2 and j < 3 * section[2], else t.
    freqs: [3, T, D/2] → [T, D/2]."""
    out = freqs[0].clone()
    for axis in (1, 2):
        idx = slice(axis, 3 * section[axis], 3)
        out[..., idx] = freqs[axis, ..., idx]
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos/sin: [T, D]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + _rotate_half(x) * sin


def write_kv(layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> None:
    # layer_cache: [2, num_blocks, KVH, bs, D]; k, v: [T, KVH, D]
    blocks, offsets = meta.slot_blocks_offsets
    layer_cache[0, blocks, :, offsets] = k.to(layer_cache.dtype)
    layer_cache[1, blocks, :, offsets] = v.to(layer_cache.dtype)


def _group_attention(q: torch.Tensor, layer_cache: torch.Tensor, g: AttentionGroup,
                     scale: float, chunk: int | None = None) -> torch.Tensor:
    """One SDPA for a group; GQA without repeating KV: a KV head's G query heads (x max_q
    positions) ride as G * max_q query rows. Returns [N, H, D] for `g.tok_rows`."""
    B, max_q, (H, D), KVH = g.num_seqs, g.max_q, q.shape[1:], layer_cache.shape[2]
    G = H // KVH
    blocks, g_mask = g.window(chunk)                               # [B, nb], [B, 1, max_q, L]
    # (block, kv head) pairs in [B, KVH, num_blocks] order: one gather, already head-major
    pairs = (blocks[:, None, :] * KVH + torch.arange(KVH, device=q.device)[:, None]).flatten()
    kv = layer_cache.flatten(1, 2).index_select(1, pairs)          # [2, B*KVH*nb, bs, D]
    kv = kv.view(2, B, KVH, -1, D).to(q.dtype)                     # [2, B, KVH, L, D]
    qg = q.index_select(0, g.tok_rows)                             # [N, H, D]
    if max_q == 1:                                                 # decodes: nothing to pad
        o = F.scaled_dot_product_attention(qg.view(B, KVH, G, D), kv[0], kv[1],
                                           attn_mask=g_mask, scale=scale)
        return o.reshape(B, H, D)
    qp = q.new_zeros(B * max_q, H, D).index_copy_(0, g.pad_rows, qg)
    qp = qp.view(B, max_q, KVH, G, D).permute(0, 2, 3, 1, 4).reshape(B, KVH, G * max_q, D)
    mask = g_mask.expand(-1, G, -1, -1).reshape(B, 1, G * max_q, -1)   # rows (g, j)
    o = F.scaled_dot_product_attention(qp, kv[0], kv[1], attn_mask=mask, scale=scale)
    o = o.view(B, KVH, G, max_q, D).permute(0, 3, 1, 2, 4).reshape(B * max_q, H, D)
    return o.index_select(0, g.pad_rows)                           # [N, H, D]


def paged_attention(q: torch.Tensor, layer_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, chunk: int | None = None) -> torch.Tensor:
    """Reference paged attention (CPU, exact). The new queries sit at the END of the context,
    so query j sees keys 0..ctx-q_len+j (with `chunk`: only those of its own chunk,
    k // chunk == pos // chunk). Batched groups (`meta.groups`) run one SDPA each; the
    sequences left over run one by one: gather its blocks from the first query's chunk on
    (blocks before it are not read), SDPA."""
    num_heads, num_kv_heads = q.shape[1], layer_cache.shape[2]
    out = torch.empty_like(q)                                      # [T, H, D]
    groups, singles = meta.groups
    for g in groups:
        out.index_copy_(0, g.tok_rows, _group_attention(q, layer_cache, g, scale, chunk))
    for i in singles:
        ctx = meta.context_lens[i]
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        q_len, bs = end - start, meta.block_size
        first_block = ((ctx - q_len) // chunk * chunk) // bs if chunk else 0
        base = first_block * bs                                    # first key read
        num_blocks = (ctx + bs - 1) // bs
        table = torch.tensor(meta.block_tables[i][first_block:num_blocks], device=q.device,
                             dtype=torch.long)
        kv = layer_cache[:, table]                                 # [2, nb, KVH, bs, D]
        kv = kv.transpose(1, 2).flatten(2, 3)[:, :, :ctx - base]   # [2, KVH, ctx - base, D]
        k, v = kv[0].to(q.dtype), kv[1].to(q.dtype)
        if num_heads != num_kv_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=0)
            v = v.repeat_interleave(num_heads // num_kv_heads, dim=0)
        qi = q[start:end].transpose(0, 1)                          # [H, q_len, D]
        mask = None
        if q_len > 1 or chunk:
            qpos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
            keys = torch.arange(base, ctx, device=q.device)[None, :]
            mask = keys <= qpos                                    # [q_len, ctx - base]
            if chunk:
                mask = mask & (keys >= qpos // chunk * chunk)
        o = F.scaled_dot_product_attention(qi[None], k[None], v[None], attn_mask=mask, scale=scale)
        out[start:end] = o[0].transpose(0, 1)
    return out


def _act(name: str):
    if name == "silu":
        return F.silu
    from transformers.activations import ACT2FN
    return ACT2FN[name]


class Attention(nn.Module):
    """GQA over the paged cache; `qk_norm`: an RMSNorm over each head of q and k before rotary
    (Qwen3)."""

    def __init__(self, cfg, qkv_bias: bool, o_bias: bool = False, qk_norm: bool = False):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.scale = self.head_dim ** -0.5
        h, tp = cfg.hidden_size, get_tp().size
        if self.num_heads % tp or (self.num_kv_heads % tp and tp % self.num_kv_heads):
            raise ValueError(f"tp={tp} must divide {self.num_heads} heads and divide or be a "
                             f"multiple of {self.num_kv_heads} KV heads")
        # TP: q heads split; KV heads split, or replicated when fewer than ranks (rank r
        # holds KV head r // (tp / kv), the one its q heads use); o_proj rows split.
        kv_shards = min(tp, self.num_kv_heads)
        self.q_proj = ColumnParallelLinear(h, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = ColumnParallelLinear(h, self.num_kv_heads * self.head_dim, qkv_bias, kv_shards)
        self.v_proj = ColumnParallelLinear(h, self.num_kv_heads * self.head_dim, qkv_bias, kv_shards)
        self.o_proj = RowParallelLinear(self.num_heads * self.head_dim, h, bias=o_bias)
        self.num_heads //= tp                                     # this rank's heads
        self.num_kv_heads //= kv_shards
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = qk_norm

    def forward(self, x, cos, sin, meta: AttentionMetadata, layer_cache) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        write_kv(layer_cache, k, v, meta)
        o = paged_attention(q, layer_cache, meta, self.scale)     # [T, H, D]
        return self.o_proj(o.reshape(T, -1))


class MLP(nn.Module):
    """SwiGLU MLP, TP-split; `reduce=False` returns this rank's partial sum (see MoE)."""

    def __init__(self, cfg, bias: bool = False, reduce: bool = True):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=bias,
                                           reduce=reduce)
        self.act = _act(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, o_bias: bool = False, mlp_bias: bool = False,
                 qk_norm: bool = False, mlp: nn.Module | None = None):
        super().__init__()
        self.self_attn = Attention(cfg, qkv_bias, o_bias, qk_norm)
        self.mlp = mlp if mlp is not None else MLP(cfg, mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, meta, layer_cache):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta, layer_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """Llama-style decoder over the paged cache. Parameter names match HF's text model.

    `make_mlp(layer_index)`: a layer's MLP where it is not the dense `MLP` (MoE layers; None
    keeps the dense one). DeepStack (Qwen3-VL): image rows may carry `1 + L` hidden-wide
    blocks, `[R, (1 + L) * hidden]`: the first is the input embedding, block 1 + i is added
    to the rows' hidden states after layer i."""

    def __init__(self, cfg, qkv_bias: bool = False, o_bias: bool = False, mlp_bias: bool = False,
                 qk_norm: bool = False, make_mlp=None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, qkv_bias, o_bias, mlp_bias, qk_norm, make_mlp and make_mlp(i))
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg, self.layers[0].self_attn.head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor, mm_embeds=None) -> torch.Tensor:
        h = self.embed_tokens(input_ids)                            # [T, hidden]
        rows, deep = split_mm_embeds(h, mm_embeds)
        cos, sin = self.rotary(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, meta, kv_cache[i])
            if deep is not None and i < deep.shape[1]:
                h.index_add_(0, rows, deep[:, i])
        return self.norm(h)


def split_mm_embeds(h: torch.Tensor, mm_embeds) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Write image rows' input embeddings into h ([T, hidden], in place) and return
    (rows [R], DeepStack blocks [R, L, hidden] or None) from mm_embeds (rows [R],
    values [R, (1 + L) * hidden]) or None."""
    if mm_embeds is None:
        return None, None
    rows, values = mm_embeds
    hidden = h.shape[1]
    values = values.to(h.dtype)
    h[rows] = values[:, :hidden]
    if values.shape[1] == hidden:
        return rows, None
    return rows, values[:, hidden:].unflatten(1, (-1, hidden))


def kv_cache_shape(text_config, num_blocks: int, block_size: int, tp_size: int = 1) -> tuple:
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return (text_config.num_hidden_layers, 2, num_blocks, max(1, kv_heads // tp_size), block_size, head_dim)

"""The CUDA path's decoder (`mmhpc.engine.gpu_forward.FastDecoder`) run on the CPU, where its
kernel calls dispatch to `mmhpc.kernels.reference`: same logits as the plain decoder
(`mmhpc.models.layers.Decoder`) over a paged cache, for a prefill then decode steps, and the
same whether run whole or as the layer-range pieces the decode CUDA graphs are made of.
The Triton kernels themselves are checked on the GPU (tests/test_kernels_gpu.py)."""
from __future__ import annotations

import pytest
import torch

from mmhpc.engine.cuda_graphs import graph_pieces
from mmhpc.engine.gpu_forward import FastDecoder, FreshChunks, GpuAttnMeta
from mmhpc.kernels import reference
from mmhpc.models import load_model
from mmhpc.models.layers import AttentionMetadata, kv_cache_shape

BLOCK = 4


def test_graph_pieces():
    assert graph_pieces(32, 8) == [(0, 1), (1, 9), (9, 17), (17, 25), (25, 32)]
    assert graph_pieces(28, 8) == [(0, 1), (1, 9), (9, 17), (17, 25), (25, 28)]
    assert graph_pieces(2, 8) == [(0, 1), (1, 2)]
    assert graph_pieces(32, 0) == [(0, 32)]
    assert graph_pieces(1, 8) == [(0, 1)]
    for n in (1, 2, 9, 10, 32, 80):
        p = graph_pieces(n, 8)
        assert p[0][0] == 0 and p[-1][1] == n and all(a[1] == b[0] for a, b in zip(p, p[1:]))


def _positions(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    pos = torch.arange(start, start + len(ids))
    return pos.expand(3, -1).contiguous() if getattr(model, "uses_mrope", False) else pos


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_fast_decoder_matches_plain_decoder(family):
    """Qwen3-VL: QK-norm, and image rows with DeepStack blocks in the prefill step; the MoE:
    its MoE layers at decode steps by `kernels.moe_decode` (here its torch reference)."""
    from mmhpc.tools.tiny import tiny_checkpoint
    model = load_model(tiny_checkpoint(family), torch.float32, "cpu")
    dec = model.language_model
    shape = kv_cache_shape(model.text_config, 32, BLOCK)
    caches = {"plain": torch.zeros(shape), "whole": torch.zeros(shape), "pieces": torch.zeros(shape)}
    fast = FastDecoder(dec)                   # fuses qkv / gate_up: the module weights become views
    fast.moe_decode = True                    # MoE decode steps: kernels.moe_decode's reference
    table = list(range(31, -1, -1))           # non-contiguous blocks on purpose
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, dec.config.vocab_size - 8, (13,), generator=g)
    steps = [prompt] + [torch.randint(3, 200, (1,), generator=g) for _ in range(4)]
    width = dec.config.hidden_size * (1 + getattr(model, "deepstack_levels", 0))
    mm = (torch.arange(2, 7), torch.randn(5, width, generator=g))      # prefill's image rows
    start = 0
    for ids in steps:
        n = len(ids)
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + n)])
        pos = _positions(model, ids, start)
        with torch.inference_mode():
            meta = AttentionMetadata(slots, [0, n], [start + n], [table], BLOCK)
            rows = mm if start == 0 else None
            ref = dec(ids, pos, meta, caches["plain"], rows)
            gmeta = GpuAttnMeta(slots, torch.tensor([table], dtype=torch.int32),
                                torch.tensor([start + n], dtype=torch.int32),
                                torch.tensor([0, n], dtype=torch.int32), n, start + n,
                                decode=n == 1)
            whole = fast(ids, pos, gmeta, caches["whole"], rows)
            state = fast.begin(ids, pos, rows)
            for lo, hi in graph_pieces(fast.num_layers, 1):
                fast.layers(state, lo, hi, gmeta, caches["pieces"])
            pieces = fast.end(state)
        torch.testing.assert_close(whole, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(pieces, whole)
        start += n
    torch.testing.assert_close(caches["whole"], caches["plain"], rtol=1e-4, atol=1e-4)


def test_rotary_write_kv_reference():
    """The fused rotary + cache write equals rotary (the plain decoder's) then write_kv."""
    from mmhpc.models.layers import apply_rotary
    T, Hq, Hkv, D = 5, 6, 2, 16
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g)
    ang = torch.randn(T, D // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    cache = torch.zeros(2, 4, Hkv, BLOCK, D)
    slots = torch.tensor([3, -1, 0, 9, 15])
    qk = qkv[:, :(Hq + Hkv) * D].view(T, Hq + Hkv, D)
    want = apply_rotary(qk.clone(), cos, sin)
    v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
    want_cache = torch.zeros_like(cache)
    reference.write_kv(want[:, Hq:], v, want_cache, slots)
    reference.rotary_write_kv(qk, Hq, v, cos, sin, cache, slots)
    torch.testing.assert_close(qk, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache, want_cache, rtol=1e-6, atol=1e-6)
    assert cache[:, 0].abs().sum() > 0 and cache[:, 3].abs().sum() > 0


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_prefill_last_layer_on_sampled_rows(family, tiny_llava, tiny_qwen2_vl):
    """A prefill step whose last layer runs attention + MLP on the sampled rows alone (the CUDA
    runner's default) gives those rows' hidden states of the full step and writes the same
    KV; a step that samples no row still writes every layer's KV."""
    path = tiny_llava if family == "llava" else tiny_qwen2_vl
    model = load_model(path, torch.float32, "cpu")
    fast = FastDecoder(model.language_model)
    g = torch.Generator().manual_seed(2)
    vocab = model.text_config.vocab_size
    # seq 0: 9 fresh tokens (sampled); seq 1: 6 tokens after 5 cached (not sampled: a middle
    # chunk); seq 2: 3 tokens after 7 cached (sampled)
    chunks = [(9, 0), (6, 5), (3, 7)]
    tables = [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    shape = kv_cache_shape(model.text_config, 24, BLOCK)
    base = torch.randn(shape, generator=g) * 0.1          # the cached prefixes
    ids, pos, slots, qs = [], [], [], [0]
    for (n, p), table in zip(chunks, tables):
        ids.append(torch.randint(3, vocab - 8, (n,), generator=g))
        pos.append(_positions(model, ids[-1], p))
        slots += [table[t // BLOCK] * BLOCK + t % BLOCK for t in range(p, p + n)]
        qs.append(qs[-1] + n)
    ids, pos = torch.cat(ids), torch.cat(pos, dim=-1)
    lens = [n + p for n, p in chunks]

    def run(rows, seqs):
        cache = base.clone()
        meta = GpuAttnMeta(torch.tensor(slots), torch.tensor(tables, dtype=torch.int32),
                           torch.tensor(lens, dtype=torch.int32),
                           torch.tensor(qs, dtype=torch.int32), max(n for n, _ in chunks),
                           max(lens), decode=False, sample_rows=rows, sample_seqs=seqs)
        with torch.inference_mode():
            return fast(ids, pos, meta, cache), cache

    full, full_cache = run(None, None)
    rows = torch.tensor([qs[1] - 1, qs[3] - 1])
    pruned, cache = run(rows, torch.tensor([0, 2]))
    torch.testing.assert_close(pruned, full[rows], rtol=1e-5, atol=1e-5)
    assert torch.equal(cache, full_cache)
    none, cache = run(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    assert none.shape[0] == 0 and torch.equal(cache, full_cache)


def test_fresh_chunks():
    """The trailing chunks with nothing cached before them, as FlashAttention takes them."""
    assert FreshChunks.of([0, 1, 2, 5], [7, 9, 3], "cpu").row == 2     # 2 decode rows, 1 new
    f = FreshChunks.of([0, 1, 4, 9, 11], [7, 8, 5, 2], "cpu")
    assert (f.seq, f.row, f.cu_seqlens.tolist(), f.max_seqlen, f.head_max_seqlen) == \
        (2, 4, [0, 5, 7], 5, 3)
    f = FreshChunks.of([0, 5, 7], [5, 2], "cpu")
    assert (f.seq, f.row, f.head_max_seqlen) == (0, 0, 0)
    assert FreshChunks.of([0, 1, 2], [5, 2], "cpu") is None          # the last has a prefix


def check_split_fresh_tail(device, dtype, fresh_attention=None, tol=1e-5) -> list[int]:
    """A step of decode rows, a continued chunk and new prompts, through FastDecoder with the
    new prompts' attention on the fresh-chunk path (`fresh_attention` stands in for
    FlashAttention where given) and the rest on the paged kernel, merged in row order: the
    same hidden states and KV as the paged kernel alone, and the sampled rows' states with the
    last layer pruned. Returns the row counts the stand-in saw. Shared with the GPU tier."""
    from mmhpc import kernels
    from mmhpc.tools.tiny import tiny_checkpoint
    calls: list[int] = []
    real = kernels.fresh_prefill_attention

    def counted(q, *args):
        calls.append(len(q))
        return (fresh_attention or real)(q, *args)

    model = load_model(tiny_checkpoint("llava"), dtype, device)
    fast = FastDecoder(model.language_model)
    g = torch.Generator().manual_seed(3)
    vocab = model.text_config.vocab_size
    chunks = [(1, 6), (1, 9), (4, 3), (7, 0), (2, 0)]     # (chunk, cached before it)
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(len(chunks))]
    base = torch.randn(kv_cache_shape(model.text_config, 4 * len(chunks), BLOCK), generator=g)
    base = (base * 0.1).to(device=device, dtype=dtype)
    ids = torch.randint(3, vocab - 8, (sum(c for c, _ in chunks),), generator=g).to(device)
    pos = torch.cat([torch.arange(p, p + c) for c, p in chunks]).to(device)
    slots = [tables[i][t // BLOCK] * BLOCK + t % BLOCK
             for i, (c, p) in enumerate(chunks) for t in range(p, p + c)]
    qs = [0]
    for c, _ in chunks:
        qs.append(qs[-1] + c)
    lens = [c + p for c, p in chunks]
    last = torch.tensor(qs[1:], device=device) - 1

    def run(fresh, rows=None):
        cache = base.clone()
        i32 = dict(dtype=torch.int32, device=device)
        meta = GpuAttnMeta(torch.tensor(slots, device=device), torch.tensor(tables, **i32),
                           torch.tensor(lens, **i32), torch.tensor(qs, **i32), 7, max(lens),
                           decode=False, fresh=fresh, sample_rows=rows,
                           sample_seqs=None if rows is None else torch.arange(5, device=device))
        with torch.inference_mode():
            return fast(ids, pos, meta, cache), cache

    want, want_cache = run(None)
    kernels.fresh_prefill_attention = counted
    try:
        got, cache = run(FreshChunks.of(qs, lens, device))
        pruned, _ = run(FreshChunks.of(qs, lens, device), last)
    finally:
        kernels.fresh_prefill_attention = real
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(cache, want_cache, rtol=tol, atol=tol)   # later layers' KV
    torch.testing.assert_close(pruned, want[last], rtol=tol, atol=tol)
    return calls


def test_prefill_split_fresh_tail():
    def fresh(q, k, v, cu, max_q, scale):          # causal attention within each chunk
        out = torch.empty_like(q)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            n = b - a
            mask = torch.ones(n, n, dtype=torch.bool).tril()
            out[a:b] = torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1).double(), k[a:b].transpose(0, 1).double(),
                v[a:b].transpose(0, 1).double(), attn_mask=mask, scale=scale, enable_gqa=True
            ).transpose(0, 1).to(q.dtype)
        return out

    calls = check_split_fresh_tail("cpu", torch.float32, fresh)
    assert calls and set(calls) == {9}                  # the two new prompts, every layer

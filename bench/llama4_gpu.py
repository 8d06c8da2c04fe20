"""Llama-4 decode speed on one GPU: Scout's real width cut to 8 of its 48 layers, random bf16.

Times, in the same run on the same card:
- ours: mmhpc's Llama-4 decoder layers (mmhpc/models/llama4.py; the MoE of mmhpc/models/moe.py:
  top-1 routing, tokens sorted by expert, two grouped GEMMs `torch._grouped_mm`, shared expert)
  over a static KV cache, one decode step captured in a CUDA graph per batch size;
- HF: `Llama4ForCausalLM` at the same depth, the same weights (shared tensors, no copy),
  decode steps with its DynamicCache;
- the floors: batch 1 = the active bytes (attention, shared expert, one routed expert per
  layer, router, lm_head) over the card's measured read rate; batch 64 = every expert's bytes
  plus the rest.
First it checks ours against HF: the last prompt token's logits after the same prompt.

    python bench/llama4_gpu.py                 # CUDA: Scout width, 8 layers, batch 1 and 64
    python bench/llama4_gpu.py --smoke         # CPU: a tiny config, float32, same code path
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from mmhpc.models.llama4 import Llama4Decoder


def text_config(smoke: bool, layers: int):
    from transformers import Llama4TextConfig
    if smoke:
        return Llama4TextConfig(
            vocab_size=512, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
            attention_chunk_size=16, floor_scale=8, attn_scale=0.5, use_qk_norm=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    return Llama4TextConfig(      # meta-llama/Llama-4-Scout-17B-16E-Instruct, 8 layers
        vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
        num_hidden_layers=layers, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
        attention_chunk_size=8192, use_qk_norm=True, attn_temperature_tuning=True,
        floor_scale=8192, attn_scale=0.1, rms_norm_eps=1e-5, max_position_embeddings=10485760,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192})


def build(cfg, device, dtype):
    """HF's model with small random weights, and ours over the same tensors."""
    from transformers import Llama4ForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        hf = Llama4ForCausalLM._from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    with torch.device("meta"):
        ours = Llama4Decoder(cfg).eval()
    hf_params = dict(hf.named_parameters())
    for name, _ in list(ours.named_parameters()):
        src = hf_params["model." + name]
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            src = src.transpose(1, 2)          # ours [E, out, in] = HF's [E, in, out] viewed
        mod, attr = _owner(ours, name)
        setattr(mod, attr, torch.nn.Parameter(src.detach(), requires_grad=False))
    for name, buf in list(ours.named_buffers()):
        mod, attr = _owner(ours, name)
        fresh = torch.zeros(buf.shape, dtype=buf.dtype, device=device) if buf.is_meta else buf
        setattr(mod, attr, fresh)
    ours.rotary.inv_freq = _inv_freq(cfg, device)
    return hf, ours, hf.lm_head.weight


def _owner(module, name):
    *path, attr = name.split(".")
    for p in path:
        module = getattr(module, p)
    return module, attr


def _inv_freq(cfg, device):
    from mmhpc.models.layers import RotaryEmbedding
    return RotaryEmbedding(cfg, cfg.head_dim).inv_freq.to(device)


class StaticDecode:
    """One decode step of our layers for `batch` sequences over a static KV cache
    [L, 2, B, KVH, max_len, D]: capturable (no host sync), replayed as a CUDA graph."""

    def __init__(self, model: Llama4Decoder, lm_head, batch: int, max_len: int):
        cfg, dev = model.config, lm_head.device
        self.model, self.lm_head, self.cfg = model, lm_head, cfg
        a = model.layers[0].self_attn
        self.cache = torch.zeros(cfg.num_hidden_layers, 2, batch, a.num_kv_heads, max_len, a.head_dim,
                                 dtype=lm_head.dtype, device=dev)
        self.ids = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, dtype=torch.long, device=dev)
        self.keys = torch.arange(max_len, device=dev)
        self.graph = None
        self.out = None

    def _attention(self, attn, x, cos, sin, cache):
        B = x.shape[0]
        q, k, v = attn.qkv(x, cos, sin, self.pos)                        # [B, H|KVH, D]
        b = torch.arange(B, device=x.device)
        cache[0, b, :, self.pos] = k                                     # [B, KVH, D] at pos
        cache[1, b, :, self.pos] = v
        mask = self.keys[None] <= self.pos[:, None]                      # [B, L]
        if attn.chunk:
            mask &= self.keys[None] >= self.pos[:, None] // attn.chunk * attn.chunk
        o = F.scaled_dot_product_attention(q[:, :, None], cache[0], cache[1],
                                           attn_mask=mask[:, None, None], scale=attn.scale,
                                           enable_gqa=True)              # [B, H, 1, D]
        return attn.o_proj(o.reshape(B, -1))

    def step(self) -> torch.Tensor:
        m = self.model
        h = m.embed_tokens(self.ids)                                      # [B, hidden]
        cos, sin = m.rotary(self.pos, h.dtype)
        half = cos.shape[-1] // 2
        cos, sin = cos[:, :half], sin[:, :half]
        for i, layer in enumerate(m.layers):
            h = h + self._attention(layer.self_attn, layer.input_layernorm(h), cos, sin, self.cache[i])
            h = h + layer.feed_forward(layer.post_attention_layernorm(h))
        return F.linear(m.norm(h), self.lm_head)                          # [B, V]

    def capture(self) -> None:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.step()

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.out


@torch.inference_mode()
def check(hf, ours, lm_head, cfg, device, prompt_len: int) -> dict:
    """Last prompt token's logits: ours (token by token through the decode step) vs HF."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=g).to(device)
    ref = hf(input_ids=ids).logits[0, -1].float()
    dec = StaticDecode(ours, lm_head, 1, prompt_len + 1)
    for t in range(prompt_len):
        dec.ids.fill_(int(ids[0, t]))
        dec.pos.fill_(t)
        got = dec.step()[0].float()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    cos = F.cosine_similarity(got, ref, dim=0).item()
    return {"max_rel_err": err, "cosine": cos, "same_argmax": bool(got.argmax() == ref.argmax())}


def _time(fn, iters: int, cuda: bool) -> float:
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


@torch.inference_mode()
def time_ours(ours, lm_head, batch: int, ctx: int, iters: int, cuda: bool) -> float:
    dec = StaticDecode(ours, lm_head, batch, ctx + iters + 8)
    dec.ids.copy_(torch.randint(3, ours.config.vocab_size, (batch,), device=lm_head.device))
    dec.pos.fill_(ctx)
    if cuda:
        dec.capture()
    return _time(dec.run, iters, cuda)


@torch.inference_mode()
def time_hf(hf, batch: int, ctx: int, iters: int, cuda: bool) -> float:
    from transformers import DynamicCache
    dev = hf.lm_head.weight.device
    ids = torch.randint(3, hf.config.vocab_size, (batch, ctx), device=dev)
    cache = DynamicCache(config=hf.config)
    out = hf(input_ids=ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)

    def step():
        nonlocal nxt
        nxt = hf(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return _time(step, iters, cuda)


def read_rate(device, cuda: bool) -> float:
    """Bytes per second of a sum over a large bf16 tensor (reads only)."""
    n = (2 << 30) if cuda else (64 << 20)
    x = torch.ones(n // 2, dtype=torch.bfloat16, device=device)
    ms = _time(lambda: x.sum(dtype=torch.float32), 20 if cuda else 3, cuda)
    return n / (ms / 1e3)


def active_bytes(cfg, itemsize: int, every_expert: bool) -> int:
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    expert = 3 * h * cfg.intermediate_size
    routed = cfg.num_local_experts if every_expert else cfg.num_experts_per_tok
    per_layer = attn + expert * (1 + routed) + h * cfg.num_local_experts
    return (cfg.num_hidden_layers * per_layer + cfg.vocab_size * h) * itemsize


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny config, float32")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--ctx", type=int, default=128, help="tokens already in the cache")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        args.ctx, args.iters = min(args.ctx, 32), min(args.iters, 3)
    cfg = text_config(not cuda, args.layers)
    hf, ours, lm_head = build(cfg, device, dtype)
    params = sum(p.numel() for p in hf.parameters())
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype),
              "layers": cfg.num_hidden_layers, "params_B": round(params / 1e9, 3),
              "torch": torch.__version__}
    import transformers
    result["transformers"] = transformers.__version__
    result["check"] = check(hf, ours, lm_head, cfg, device, 24)
    if not cuda:
        assert result["check"]["max_rel_err"] < 1e-4, result["check"]
    rate = read_rate(device, cuda)
    result["read_TB_s"] = round(rate / 1e12, 3)
    item = torch.tensor([], dtype=dtype).element_size()
    for b in (int(x) for x in args.batches.split(",")):
        row = {"ours_ms": round(time_ours(ours, lm_head, b, args.ctx, args.iters, cuda), 3)}
        if not args.skip_hf:
            row["hf_ms"] = round(time_hf(hf, b, args.ctx, max(3, args.iters // 5), cuda), 3)
            row["speedup_vs_hf"] = round(row["hf_ms"] / row["ours_ms"], 1)
        floor_bytes = active_bytes(cfg, item, every_expert=b > 1)
        row["floor_ms"] = round(floor_bytes / rate * 1e3, 3)
        row["x_floor"] = round(row["ours_ms"] / row["floor_ms"], 2)
        row["tok_s"] = round(b / row["ours_ms"] * 1e3)
        result[f"batch_{b}"] = row
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

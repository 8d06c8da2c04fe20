"""The MoE layer (mmhpc/models/moe.py) against a per-token reference and HF's MoE blocks, its
shard loading (a rank reads only its experts), and expert parallelism over real gloo groups."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mmhpc.distributed.group import TPGroup, set_tp
from mmhpc.models import loader
from mmhpc.models.moe import MoE, MoESpec, route

H, I, E = 32, 48, 8

LLAMA4 = MoESpec(H, I, E, top_k=1, scoring="sigmoid", weight_on_input=True,
                 shared_intermediate_size=I, layout="in_out")
QWEN3 = MoESpec(H, I, E, top_k=2, scoring="softmax", renormalize=True, layout="out_in")
SPECS = {"llama4": LLAMA4, "qwen3": QWEN3, "llama4_top2": MoESpec(
    H, I, E, top_k=2, scoring="sigmoid", weight_on_input=True, layout="in_out")}


def _checkpoint(spec: MoESpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named tensors of one MoE block in the spec's checkpoint layout."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) / s[-1] ** 0.5        # noqa: E731
    if spec.layout == "in_out":
        w = {"experts.gate_up_proj": r(E, H, 2 * I), "experts.down_proj": r(E, I, H)}
    else:
        w = {"experts.gate_up_proj": r(E, 2 * I, H), "experts.down_proj": r(E, H, I)}
    w["router.weight"] = r(E, H) * 4
    if spec.shared_intermediate_size:
        w.update({"shared_expert.gate_proj.weight": r(I, H), "shared_expert.up_proj.weight": r(I, H),
                  "shared_expert.down_proj.weight": r(H, I)})
    return w


def _build(spec: MoESpec, path, tp: TPGroup = TPGroup()) -> MoE:
    prev = set_tp(tp)
    try:
        moe = MoE(spec)
    finally:
        set_tp(prev)
    loader.load_weights(moe, path, [])
    return moe


def _reference(spec: MoESpec, w: dict, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert."""
    gu, down = w["experts.gate_up_proj"], w["experts.down_proj"]
    if spec.layout == "in_out":
        gu, down = gu.transpose(1, 2), down.transpose(1, 2)          # [E, 2I, H], [E, H, I]
    weights, ids = route(x @ w["router.weight"].T, spec)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(spec.top_k):
            e, s = int(ids[t, j]), weights[t, j]
            xin = x[t] * s if spec.weight_on_input else x[t]
            gate, up = (gu[e] @ xin).chunk(2)
            y = down[e] @ (torch.nn.functional.silu(gate) * up)
            out[t] += y if spec.weight_on_input else y * s
        if spec.shared_intermediate_size:
            out[t] += w["shared_expert.down_proj.weight"] @ (
                torch.nn.functional.silu(w["shared_expert.gate_proj.weight"] @ x[t])
                * (w["shared_expert.up_proj.weight"] @ x[t]))
    return out


@pytest.mark.parametrize("name", list(SPECS))
def test_moe_matches_reference(name, tmp_path):
    spec = SPECS[name]
    w = _checkpoint(spec)
    save_file(w, str(tmp_path / "model.safetensors"))
    moe = _build(spec, tmp_path)
    x = torch.randn(37, H)
    with torch.no_grad():
        out = moe(x)
    torch.testing.assert_close(out, _reference(spec, w, x), rtol=1e-5, atol=1e-5)
    assert int(moe.tokens_per_expert.sum()) == 37 * spec.top_k


def test_moe_matches_hf_llama4(tmp_path):
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe
    cfg = Llama4TextConfig(hidden_size=H, intermediate_size=I, intermediate_size_mlp=I,
                           num_local_experts=E, num_experts_per_tok=1, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    hf = Llama4TextMoe(cfg).eval()
    w = _checkpoint(LLAMA4)
    hf.load_state_dict(w)
    save_file(w, str(tmp_path / "model.safetensors"))
    moe = _build(LLAMA4, tmp_path)
    x = torch.randn(21, H)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), hf(x)[0], rtol=1e-5, atol=1e-5)


def test_moe_matches_hf_qwen3_moe(tmp_path):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                         num_experts_per_tok=2, norm_topk_prob=True)
    hf = Qwen3MoeSparseMoeBlock(cfg).eval()
    w = _checkpoint(QWEN3)
    hf.load_state_dict({"gate.weight": w["router.weight"],
                        **{k: v for k, v in w.items() if k.startswith("experts.")}})
    save_file(w, str(tmp_path / "model.safetensors"))
    moe = _build(QWEN3, tmp_path)
    x = torch.randn(21, H)
    with torch.no_grad():
        out = hf(x[None])
        out = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(moe(x), out[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp,ep", [(2, 2), (4, 2), (4, 4), (2, 1)])
def test_rank_reads_only_its_experts(tp, ep, tmp_path):
    """Each rank's expert bytes are 1/tp of the whole (E/ep experts, 1/(tp/ep) of each), and
    the slices are the right ones."""
    spec = LLAMA4
    w = _checkpoint(spec)
    save_file({k: v for k, v in w.items() if k.startswith("experts.")}, str(tmp_path / "model.safetensors"))
    full = sum(v.numel() * 4 for k, v in w.items() if k.startswith("experts."))
    gu = w["experts.gate_up_proj"].transpose(1, 2)                       # [E, 2I, H]
    parts, local = tp // ep, E // ep
    for rank in range(tp):
        prev = set_tp(TPGroup(rank, tp, ep=ep))
        try:
            moe = MoE(spec)
        finally:
            set_tp(prev)
        before = loader.bytes_read
        names = {n: p for n, p in moe.named_parameters() if n.startswith("experts.")}
        for n in list(dict(moe.named_parameters())):
            if not n.startswith("experts."):
                delattr(*_owner(moe, n))
        loader.load_weights(moe, tmp_path, [])
        assert loader.bytes_read - before == full // tp
        g, p, i = rank // parts, rank % parts, I // parts
        expect = torch.cat([gu[g * local:(g + 1) * local, p * i:(p + 1) * i],
                            gu[g * local:(g + 1) * local, I + p * i:I + (p + 1) * i]], dim=1)
        torch.testing.assert_close(names["experts.gate_up_proj"].detach(), expect)


@pytest.mark.parametrize("tp,ep", [(1, 1), (4, 2)])
def test_per_expert_checkpoint_loads_like_fused(tp, ep, tmp_path):
    """Qwen3-MoE's per-expert keys (experts.{e}.gate_proj.weight ...) fill the fused
    parameters as the fused checkpoint does; a rank reads only its experts' parts."""
    w = _checkpoint(QWEN3)
    gu, down = w.pop("experts.gate_up_proj"), w.pop("experts.down_proj")     # [E, 2I, H], [E, H, I]
    for e in range(E):
        w[f"experts.{e}.gate_proj.weight"] = gu[e, :I].contiguous()
        w[f"experts.{e}.up_proj.weight"] = gu[e, I:].contiguous()
        w[f"experts.{e}.down_proj.weight"] = down[e].contiguous()
    (tmp_path / "per").mkdir()
    save_file(w, str(tmp_path / "per" / "model.safetensors"))
    fused = {**{k: v for k, v in w.items() if ".experts." not in "." + k},
             "experts.gate_up_proj": gu, "experts.down_proj": down}
    save_file(fused, str(tmp_path / "model.safetensors"))
    for rank in range(tp):
        a = _build(QWEN3, tmp_path, TPGroup(rank, tp, ep=ep))
        before = loader.bytes_read
        b = _build(QWEN3, tmp_path / "per", TPGroup(rank, tp, ep=ep))
        expert_bytes = loader.bytes_read - before - sum(
            v.numel() * 4 for k, v in w.items() if not k.startswith("experts."))
        assert expert_bytes == (gu.numel() + down.numel()) * 4 // tp
        for n, p in a.named_parameters():
            torch.testing.assert_close(p, dict(b.named_parameters())[n], rtol=0, atol=0)


def _owner(module, name):
    *path, attr = name.split(".")
    for p in path:
        module = getattr(module, p)
    return module, attr


def test_bad_sizes_one_line():
    with pytest.raises(ValueError, match="ep=3 must divide tp=4"):
        prev = set_tp(TPGroup(0, 4, ep=3))
        try:
            MoE(LLAMA4)
        finally:
            set_tp(prev)
    with pytest.raises(ValueError, match="scoring 'bogus' not implemented"):
        MoESpec(H, I, E, 1, scoring="bogus")


# ---------------------------------------------------------------- expert parallelism (gloo)
def _ep_worker(rank: int, tp: int, ep: int, spec_name: str, path: str, port: int, queue) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    set_tp(TPGroup(rank, tp, dist.group.WORLD, dist.group.WORLD, "cpu", True, ep=ep))
    moe = MoE(SPECS[spec_name])
    loader.load_weights(moe, path, [])
    x = torch.randn(13, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = [moe(x), moe(x[:1])]          # fewer tokens than ranks: empty shares
    queue.put((rank, [o.tolist() for o in outs], moe.tokens_per_expert.tolist()))
    dist.destroy_process_group()


@pytest.mark.parametrize("tp,ep,spec_name", [
    (2, 2, "llama4"), pytest.param(4, 2, "qwen3", marks=pytest.mark.slow),
    pytest.param(2, 1, "llama4", marks=pytest.mark.slow)])
def test_expert_parallel_matches_one_rank(tp, ep, spec_name, tmp_path):
    import torch.multiprocessing as mp

    from tests.slurm_cluster import free_port
    spec = SPECS[spec_name]
    w = _checkpoint(spec)
    save_file(w, str(tmp_path / "model.safetensors"))
    moe = _build(spec, tmp_path)
    x = torch.randn(13, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = [moe(x), moe(x[:1])]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ep_worker, args=(r, tp, ep, spec_name, str(tmp_path), port, queue))
             for r in range(tp)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for rank, outs, counts in results:
        for got, ref in zip(outs, want):
            torch.testing.assert_close(torch.tensor(got), ref, rtol=1e-5, atol=1e-5)
        assert counts == moe.tokens_per_expert.tolist(), rank

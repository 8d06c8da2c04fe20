"""Rank layout: rules, one-line errors, and golden dry-run tables (no MPI)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmhpc.config import DeploymentConfig, GroupConfig
from mmhpc.launch.hydra import ConfigError, compose_config
from mmhpc.launch.layout import LayoutError, make_layout
from mmhpc.launch.main import dry_run_layout

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).resolve().parents[1]


def dep(name="e_p_d", shares=False, cross=False, **groups) -> DeploymentConfig:
    kw = {g: GroupConfig(instances=0) for g in ("aggregated", "encode", "prefill", "decode")}
    for g, (n, tp) in groups.items():
        kw[g] = GroupConfig(instances=n, tp=tp)
    return DeploymentConfig(name=name, frontend_shares_rank=shares,
                            allow_cross_node_instances=cross, **kw)


def roles(layout):
    return [(r.role, r.instance, r.rank_in_instance) for r in layout.ranks]


def test_agg_one_rank():
    lay = make_layout(1, 1, DeploymentConfig())
    assert roles(lay) == [("aggregated", 0, 0)]
    assert lay[0].hosts_frontend and lay[0].device == -1


def test_e_p_d_four_ranks():
    lay = make_layout(4, 4, dep(encode=(1, 1), prefill=(1, 1), decode=(1, 1)))
    assert roles(lay) == [("frontend", -1, 0), ("encode", 0, 0), ("prefill", 0, 0),
                          ("decode", 0, 0)]
    assert lay.leaders("decode") == [3]


def test_ep_d_shared_and_alone():
    alone = make_layout(3, 3, dep("ep_d", prefill=(1, 1), decode=(1, 1)))
    assert [r.role for r in alone.ranks] == ["frontend", "prefill", "decode"]
    shared = make_layout(2, 2, dep("ep_d", shares=True, prefill=(1, 1), decode=(1, 1)))
    assert [r.role for r in shared.ranks] == ["prefill", "decode"]
    assert shared[0].hosts_frontend and not shared[1].hosts_frontend


def test_rankinfo_repr():
    lay = make_layout(8, 8, dep(encode=(1, 1), prefill=(1, 2), decode=(2, 2)), gpus_per_node=8)
    assert repr(lay[7]) == "rank=7(8) role=decode inst=1 tp_rank=1/2 node=0 local=7 dev=7"
    assert lay.instances("decode") == [[4, 5], [6, 7]]


def test_instances_never_straddle_nodes():
    # node 0: frontend, 3 encode, prefill tp4; node 1: two decode tp4
    lay = make_layout(16, 8, dep(encode=(3, 1), prefill=(1, 4), decode=(2, 4)), gpus_per_node=8)
    for role in ("prefill", "decode"):
        for inst in lay.instances(role):
            assert len({lay[r].node for r in inst}) == 1
    # frontend + encode on node 0 leave 6 ranks there: decode tp4 goes to node 1 first-fit
    lay = make_layout(16, 8, dep(encode=(3, 1), decode=(2, 4), prefill=(1, 4)), gpus_per_node=8)
    assert all(len({lay[r].node for r in i}) == 1 for i in lay.instances("decode"))


@pytest.mark.parametrize("kwargs, world, rpn, needle", [
    (dict(encode=(1, 1), prefill=(1, 1), decode=(1, 1)), 3, 3,
     "deployment e_p_d needs 4 ranks (1 frontend + 1 encode + 1 prefill×tp1 + 1 decode×tp1), "
     "got 3: run with -n 4 or set deployment.frontend_shares_rank=true"),
    (dict(encode=(1, 1), prefill=(1, 1), decode=(1, 1)), 6, 6,
     "set deployment.decode.instances=3"),
    (dict(encode=(6, 1), prefill=(1, 1), decode=(1, 16)), 24, 8,
     "lower tp or set deployment.allow_cross_node_instances=true"),
    (dict(encode=(2, 1), prefill=(1, 1), decode=(1, 8)), 12, 4,
     "needs 8 ranks but a node has 4"),
])
def test_layout_errors_are_one_line(kwargs, world, rpn, needle):
    with pytest.raises(LayoutError) as e:
        make_layout(world, rpn, dep(**kwargs))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cross_node_instance_when_allowed():
    lay = make_layout(24, 8, dep(shares=True, encode=(8, 1), prefill=(1, 8), decode=(1, 8)),
                      gpus_per_node=8)
    assert lay.instances("decode") == [list(range(16, 24))]
    big = make_layout(24, 8, dep("ep_d", cross=True, prefill=(1, 7), decode=(1, 16)),
                      gpus_per_node=8)
    assert big.instances("decode") == [list(range(8, 24))]
    assert {big[r].node for r in big.instances("decode")[0]} == {1, 2}


def test_tp_must_divide_heads():
    d = dep("ep_d", prefill=(1, 3), decode=(1, 1))
    with pytest.raises(LayoutError, match=r"prefill.tp=3 does not divide the model's 32"):
        make_layout(5, 5, d, num_heads=32, num_kv_heads=8)
    make_layout(5, 5, dep("ep_d", prefill=(1, 2), decode=(2, 1)), num_heads=32, num_kv_heads=8)
    with pytest.raises(LayoutError, match="KV heads"):
        make_layout(7, 7, dep("ep_d", prefill=(1, 4), decode=(1, 2)), num_heads=12, num_kv_heads=6)


def test_more_ranks_per_node_than_gpus():
    # tp=1 ranks share GPUs round-robin (E/P/D's 4 ranks on one GPU) ...
    lay = make_layout(16, 16, DeploymentConfig(aggregated=GroupConfig(16)), gpus_per_node=8)
    assert [r.device for r in lay] == [r % 8 for r in range(16)]
    # (the frontend alone takes none)
    assert [r.device for r in make_layout(4, 4, dep(encode=(1, 1), prefill=(1, 1), decode=(1, 1)), gpus_per_node=1)] == [-1, 0, 0, 0]
    # ... but one TP instance never puts two of its ranks on one GPU (NCCL refuses that).
    with pytest.raises(LayoutError, match="at most 2 ranks per node"):
        make_layout(4, 4, DeploymentConfig(aggregated=GroupConfig(1, 4)), gpus_per_node=2)


# Golden dry-run tables: (file, overrides, --world-size)
GOLDEN_CASES = [
    ("agg_1.txt", [], None),
    ("e_p_d_4.txt", ["deployment=e_p_d"], None),
    ("ep_d_3.txt", ["deployment=ep_d"], None),
    ("ep_d_shared_2.txt", ["deployment=ep_d", "deployment.frontend_shares_rank=true"], None),
    ("h200_4nodes.txt", ["cluster=h200", "cluster.nodes=4", "deployment=e_p_d",
                         "deployment.encode.instances=4", "deployment.prefill.instances=3",
                         "deployment.prefill.tp=4", "deployment.decode.tp=4"], None),
    # the README's example: decode (auto) takes the 27 ranks left; the frontend shares encode's
    ("h200_4nodes_readme.txt", ["cluster=h200", "cluster.nodes=4", "deployment=e_p_d",
                                "deployment.prefill.tp=4"], None),
    ("gb200_2nodes.txt", ["cluster=gb200", "cluster.nodes=2", "deployment=ep_d",
                          "deployment.frontend_shares_rank=true", "deployment.prefill.tp=2",
                          "deployment.decode.instances=3", "deployment.decode.tp=2"], None),
    ("gb200_4nodes.txt", ["cluster=gb200", "cluster.nodes=4", "deployment=e_p_d",
                          "deployment.encode.instances=4", "deployment.prefill.instances=4",
                          "deployment.prefill.tp=2", "deployment.decode.tp=2"], None),
    ("agg_tp2_world8.txt", ["deployment.aggregated.instances=4", "deployment.aggregated.tp=2"], 8),
    # the seeds' Llama-4 Maverick E/P/D (bf16: an instance needs 8 GPUs), encode sharing GPUs
    ("maverick_e_p_d_h200_2nodes.txt", ["cluster=h200", "cluster.nodes=2", "model=llama4_maverick",
                                        "deployment=e_p_d", "deployment.encode.instances=2",
                                        "deployment.decode.instances=1", "deployment.prefill.tp=8",
                                        "deployment.prefill.ep=8", "deployment.decode.tp=8",
                                        "deployment.decode.ep=8"], 18),
    ("maverick_e_p_d_gb200_4nodes.txt", ["cluster=gb200", "cluster.nodes=4", "model=llama4_maverick",
                                         "deployment=e_p_d", "deployment.encode.instances=4",
                                         "deployment.decode.instances=1",
                                         "deployment.prefill.tp=8", "deployment.prefill.ep=8",
                                         "deployment.decode.tp=8", "deployment.decode.ep=8",
                                         "deployment.allow_cross_node_instances=true"], 20),
]


@pytest.mark.parametrize("name, overrides, world", GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_golden_dry_run(name, overrides, world):
    table = dry_run_layout(compose_config(overrides), world).table()
    path = GOLDEN / name
    if os.environ.get("MMHPC_UPDATE_GOLDEN"):
        path.write_text(table)
    assert table == path.read_text(), f"regenerate with MMHPC_UPDATE_GOLDEN=1 if intended"


def test_dry_run_cli_imports_no_torch_or_mpi():
    code = ("import sys; from mmhpc.launch.main import main; rc = main(['cluster=h200', "
            "'cluster.nodes=4', 'deployment=e_p_d', 'deployment.decode.instances=30', "
            "'--dry-run']); assert rc == 0, rc; "
            "assert 'torch' not in sys.modules and 'mpi4py.MPI' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("deployment=e_p_d world_size=32 nodes=4 ranks_per_node=8")
    assert len(out.stdout.splitlines()) == 36


@pytest.mark.parametrize("overrides, world, expect", [
    ([], 3, [("aggregated", 0, 0), ("aggregated", 1, 0), ("aggregated", 2, 0)]),
    (["deployment=e_p_d"], 5, [("frontend", -1, 0), ("encode", 0, 0), ("prefill", 0, 0),
                               ("decode", 0, 0), ("decode", 1, 0)]),
    (["deployment=ep_d", "deployment.decode.tp=2"], 6,
     [("frontend", -1, 0), ("prefill", 0, 0), ("decode", 0, 0), ("decode", 0, 1),
      ("decode", 1, 0), ("decode", 1, 1)]),
])
def test_instances_auto_takes_the_ranks_left(overrides, world, expect):
    lay = dry_run_layout(compose_config(overrides), world)
    assert roles(lay) == expect
    g = lay.deployment_config.auto_group
    assert g is None and lay.deployment_config.num_ranks == world


def test_instances_auto_errors_are_one_line():
    with pytest.raises(LayoutError, match=r"instances=auto: 3 ranks leave 0 .* run with -n 4"):
        dry_run_layout(compose_config(["deployment=e_p_d"]), 3)
    with pytest.raises(LayoutError, match=r"leave 3 for decode instances of tp=2: run with -n 6"):
        dry_run_layout(compose_config(["deployment=ep_d", "deployment.decode.tp=2"]), 5)
    with pytest.raises(ConfigError, match="only one group may have instances=auto"):
        compose_config(["deployment=e_p_d", "deployment.prefill.instances=auto"])


def test_gpu_cluster_frontend_takes_no_gpu():
    # auto (the YAML's null): on GPU clusters the frontend shares rank 0 with a worker ...
    lay = dry_run_layout(compose_config(["cluster=h200", "deployment=e_p_d"]), None)
    assert lay[0].role == "encode" and lay[0].hosts_frontend and lay.world_size == 8
    assert "shares its GPU 0; no device of its own" in lay.table()
    # ... on CPU it runs alone; told to run alone on a GPU node it takes no GPU, and says so
    assert dry_run_layout(compose_config(["deployment=e_p_d"]), None)[0].role == "frontend"
    alone = dry_run_layout(compose_config(["cluster=h200", "deployment=e_p_d",
                                           "deployment.frontend_shares_rank=false"]), None)
    assert alone[0].device == -1 and "GPU 0 of node 0 is idle" in alone.table()


def test_ranks_that_cannot_hold_the_weights_say_what_they_need():
    """Maverick (bf16, ~800 GB) on tp=4 H200 ranks: one line with the tp that fits."""
    cfg = compose_config(["cluster=h200", "cluster.nodes=2", "model=llama4_maverick",
                          "deployment=e_p_d", "deployment.prefill.tp=4", "deployment.prefill.ep=4",
                          "deployment.decode.instances=1", "deployment.decode.tp=8",
                          "deployment.decode.ep=8"])
    with pytest.raises(LayoutError, match=r"deployment.prefill: a rank of tp=4 holds 200.\d GB .* "
                                          r"it needs 8 ranks an instance \(deployment.prefill.tp=8\)"):
        dry_run_layout(cfg, 14)
    # Scout (~218 GB) fits tp=4 ranks; ep must divide its 16 experts
    dry_run_layout(compose_config(["cluster=h200", "model=llama4_scout", "deployment.aggregated.tp=4",
                                   "deployment.aggregated.ep=4", "deployment.aggregated.instances=2"]), 8)
    with pytest.raises(LayoutError, match=r"does not divide the model's 12 experts: use ep in \[1, 2, 4\]"):
        make_layout(8, 8, DeploymentConfig(aggregated=GroupConfig(1, 8, 8)), num_heads=40,
                    num_kv_heads=8, num_experts=12)


def test_shared_gpus_place_big_instances_first():
    """More ranks a node than GPUs: tp=8 instances get one GPU a rank, encode shares."""
    lay = dry_run_layout(compose_config(["cluster=h200", "cluster.nodes=2", "model=llama4_maverick",
                                         "deployment=e_p_d", "deployment.encode.instances=2",
                                         "deployment.decode.instances=1", "deployment.prefill.tp=8",
                                         "deployment.prefill.ep=8", "deployment.decode.tp=8",
                                         "deployment.decode.ep=8"]), 18)
    for role in ("prefill", "decode"):
        (ranks,) = lay.instances(role)
        assert sorted(lay[r].device for r in ranks) == list(range(8))
        assert len({lay[r].node for r in ranks}) == 1 and {lay[r].ep for r in ranks} == {8}
    assert lay.instances("encode") == [[8], [17]] and lay[8].device == lay[17].device == 0
    assert lay[0].role == "prefill" and lay[0].hosts_frontend

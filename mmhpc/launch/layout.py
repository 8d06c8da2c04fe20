"""The rank layout: (world size, ranks per node, deployment) -> a role for every rank.

Rules, applied in this order:
1. Ranks are numbered node by node (block distribution, what `srun` and `mpirun` do by
   default): rank r lives on node r // ranks_per_node with local rank r % ranks_per_node.
   The launcher checks the real placement against this at start-up.
2. Rank 0 hosts the frontend (HTTP, tokenizer, routing). With
   `deployment.frontend_shares_rank=true` it also runs the first worker (rank 0 of the first
   instance of the deployment's first group); otherwise it runs the frontend alone.
3. Instances are placed in group order (agg: aggregated; ep_d: prefill, decode; e_p_d:
   encode, prefill, decode), instance 0 first, each on `tp` consecutive ranks of the first
   node (from node 0) that still has `tp` free ranks: an instance never straddles nodes. An
   instance larger than a node takes whole empty nodes, only with
   `deployment.allow_cross_node_instances=true`.
4. The deployment must fill the world exactly.
5. More ranks per node than GPUs (`ranks_per_node > gpus_per_node`: ranks share GPUs,
   local rank % GPUs): instances are placed largest tp first (group order among equals), so
   a big TP/EP instance gets one GPU per rank and the small ones (encode) share what is
   left; a cross-node instance then takes `gpus_per_node` ranks of each node it spans.
   E.g. Maverick E/P/D on 2 nodes x 8 H200 with 9 ranks a node: node 0 = frontend +
   prefill tp=8, node 1 = decode tp=8 + encode (beside decode's rank on GPU 0).

Examples (one node): agg on 1 rank: rank 0 = frontend + aggregated. ep_d (default, frontend
alone) on 3 ranks: 0 frontend | 1 prefill (encodes its images) | 2 decode; with
frontend_shares_rank=true on 2 ranks: 0 frontend + prefill | 1 decode. e_p_d on 4 ranks:
0 frontend | 1 encode | 2 prefill | 3 decode.

Devices: on GPU clusters (gpus_per_node > 0) a rank drives GPU `local_rank`; on CPU, -1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mmhpc.config import DeploymentConfig

FRONTEND = "frontend"
ROLES = (FRONTEND, "encode", "prefill", "decode", "aggregated")
_TP_GROUPS = ("prefill", "decode", "aggregated")   # groups whose tp splits the LLM's heads


class LayoutError(ValueError):
    """An impossible layout; the message is one line that says what would fit."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    role: str                  # one of ROLES; "frontend" only for a frontend-only rank 0
    instance: int              # index within the role's group; -1 for the frontend-only rank
    rank_in_instance: int      # the TP rank; 0 for the frontend
    tp: int
    node: int
    local_rank: int
    device: int                # CUDA device index; -1: CPU
    hosts_frontend: bool = False
    ep: int = 1                # expert-parallel groups of the instance (MoE layers)

    @property
    def is_instance_leader(self) -> bool:
        return self.rank_in_instance == 0

    def __repr__(self) -> str:
        role = f"{FRONTEND}+{self.role}" if self.hosts_frontend and self.role != FRONTEND \
            else self.role
        ep = f" ep={self.ep}" if self.ep > 1 else ""
        return (f"rank={self.rank}({self.world_size}) role={role} inst={self.instance} "
                f"tp_rank={self.rank_in_instance}/{self.tp}{ep} node={self.node} "
                f"local={self.local_rank} dev={self.device if self.device >= 0 else 'cpu'}")


@dataclass
class Layout:
    world_size: int
    ranks_per_node: int
    deployment: str
    ranks: list[RankInfo] = field(default_factory=list)
    deployment_config: DeploymentConfig | None = None   # `auto` instances filled in

    @property
    def num_nodes(self) -> int:
        return -(-self.world_size // self.ranks_per_node)

    @property
    def frontend_rank(self) -> int:
        return 0

    def __getitem__(self, rank: int) -> RankInfo:
        return self.ranks[rank]

    def instances(self, role: str) -> list[list[int]]:
        """The ranks of each instance of `role`, TP rank order."""
        out: dict[int, list[int]] = {}
        for r in self.ranks:
            if r.role == role and r.instance >= 0:
                out.setdefault(r.instance, []).append(r.rank)
        return [out[i] for i in sorted(out)]

    def leaders(self, role: str) -> list[int]:
        return [ranks[0] for ranks in self.instances(role)]

    def _validate(self) -> None:
        assert len(self.ranks) == self.world_size
        assert [r.rank for r in self.ranks] == list(range(self.world_size))
        assert self.ranks[0].hosts_frontend and sum(r.hosts_frontend for r in self.ranks) == 1
        for role in ROLES[1:]:
            for inst in self.instances(role):
                infos = [self.ranks[r] for r in inst]
                assert [i.rank_in_instance for i in infos] == list(range(infos[0].tp))

    def table(self) -> str:
        head = ("rank", "node", "local", "device", "role", "instance", "tp_rank")
        with_ep = any(r.ep > 1 for r in self.ranks)       # "ep_group": experts' group/ep
        head += ("ep_group",) if with_ep else ()
        rows = [head]
        for r in self.ranks:
            role = f"{FRONTEND}+{r.role}" if r.hosts_frontend and r.role != FRONTEND else r.role
            rows.append((str(r.rank), str(r.node), str(r.local_rank),
                         "cpu" if r.device < 0 else str(r.device), role,
                         "-" if r.instance < 0 else str(r.instance),
                         "-" if r.instance < 0 else f"{r.rank_in_instance}/{r.tp}")
                        + ((f"{r.rank_in_instance // (r.tp // r.ep)}/{r.ep}" if r.ep > 1 else "-",)
                           if with_ep else ()))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        return (f"deployment={self.deployment} world_size={self.world_size} "
                f"nodes={self.num_nodes} ranks_per_node={self.ranks_per_node}\n"
                + "\n".join(lines) + f"\n{self.frontend_placement()}\n")

    def summary(self) -> str:
        """'e_p_d: 1 frontend + 1 encode + 1 prefill×tp1 + 2 decode×tp1, 5 ranks on 1 node'."""
        what = describe(self.deployment_config) if self.deployment_config else self.deployment
        n = self.num_nodes
        return (f"{self.deployment}: {what}, {self.world_size} rank{'s' * (self.world_size > 1)} "
                f"on {n} node{'s' * (n > 1)}")

    def frontend_placement(self) -> str:
        """One line: where the frontend runs and whether it holds a GPU."""
        r0 = self.ranks[0]
        if r0.role != FRONTEND:
            dev = "its CPU" if r0.device < 0 else f"its GPU {r0.device}"
            return (f"frontend: rank 0, in the process of {r0.role} instance {r0.instance} "
                    f"(shares {dev}; no device of its own)")
        gpus = {r.device for r in self.ranks if r.node == 0 and r.device >= 0}
        idle = (f"; GPU 0 of node 0 is idle: set deployment.frontend_shares_rank=true to share "
                f"a worker's rank" if gpus and 0 not in gpus else "")
        return f"frontend: rank 0, a process of its own (no GPU){idle}"

    def __repr__(self) -> str:
        return (f"Layout({self.deployment}, world={self.world_size}, "
                f"nodes={self.num_nodes}x{self.ranks_per_node})")


def describe(dep: DeploymentConfig) -> str:
    """'1 frontend + 1 encode + 1 prefill×tp1 + auto decode×tp1'."""
    parts = [] if dep.frontend_shares_rank else ["1 frontend"]
    for g in dep.groups:
        gc = dep.group(g)
        parts.append(f"{gc.instances} {g}" + (f"×tp{gc.tp}" if g in _TP_GROUPS or gc.tp > 1 else "")
                     + (f"ep{gc.ep}" if gc.ep > 1 else ""))
    return " + ".join(parts)


def make_layout(world_size: int, ranks_per_node: int, deployment: DeploymentConfig, *,
                gpus_per_node: int = 0, num_heads: int | None = None,
                num_kv_heads: int | None = None, num_experts: int | None = None,
                params: tuple[int, int] = (0, 0), bytes_per_param: int = 2,
                gpu_memory_gb: float = 0.0) -> Layout:
    """Every rank's role; raises LayoutError (one line) when the deployment cannot fit. A group
    with `instances: auto` takes the ranks the others leave (`Layout.deployment_config`).
    `num_experts`: the model's routed experts per MoE layer (0: a dense model). `params`
    (text, vision) and `gpu_memory_gb` > 0: each instance's ranks must hold its weights."""
    try:
        dep = deployment.fill(world_size)
    except ValueError as e:
        hint = "" if deployment.frontend_shares_rank else \
            " or set deployment.frontend_shares_rank=true"
        raise LayoutError(f"deployment {deployment.name} ({describe(deployment)}): {e}{hint}") \
            from None
    if world_size < 1 or ranks_per_node < 1:
        raise LayoutError(f"world size and ranks per node must be >= 1, got {world_size}, "
                          f"{ranks_per_node}")
    ranks_per_node = min(ranks_per_node, world_size)
    if world_size % ranks_per_node:
        raise LayoutError(f"world size {world_size} is not a multiple of {ranks_per_node} "
                          f"ranks per node: launch the same number of ranks on every node")
    # More ranks than GPUs on a node: ranks share GPUs round-robin (local rank % GPUs), e.g.
    # E/P/D's 4 ranks on one GPU; a TP instance still needs one GPU per rank (checked below).
    _check_heads(dep, num_heads, num_kv_heads)
    _check_experts(dep, num_experts)
    if gpu_memory_gb > 0 and params[0]:
        _check_memory(dep, params, bytes_per_param, gpu_memory_gb, num_heads, num_kv_heads)

    need = dep.num_ranks
    if need != world_size:
        hint = f"run with -n {need}"
        if not dep.frontend_shares_rank and world_size == need - 1:
            hint += " or set deployment.frontend_shares_rank=true"
        elif dep.frontend_shares_rank and world_size == need + 1:
            hint += " or set deployment.frontend_shares_rank=false"
        elif world_size > need:
            spare = world_size - need
            g = dep.groups[-1]
            gc = dep.group(g)
            if spare % gc.tp == 0:
                hint += f" or set deployment.{g}.instances={gc.instances + spare // gc.tp}"
        raise LayoutError(f"deployment {dep.name} needs {need} ranks ({describe(dep)}), "
                          f"got {world_size}: {hint}")

    num_nodes = world_size // ranks_per_node
    free = [ranks_per_node] * num_nodes          # free ranks left per node
    slots: list[tuple[int, str, int, int, int, int]] = []   # (rank, role, inst, tp_rank, tp, ep)

    shared = 0 < gpus_per_node < ranks_per_node        # rule 5: ranks share GPUs
    unit = gpus_per_node if shared else ranks_per_node   # a cross-node instance's ranks a node

    def grab(node: int, n: int) -> list[int]:
        start = node * ranks_per_node + ranks_per_node - free[node]
        free[node] -= n
        return list(range(start, start + n))

    def take(n: int, what: str) -> list[int]:
        """n free ranks, on one node (the first with room) or, larger than a node, on
        consecutive nodes (`unit` ranks each)."""
        if n <= unit:
            for node in range(num_nodes):
                if free[node] >= n:
                    return grab(node, n)
            raise LayoutError(f"{what} (tp={n}) does not fit on one node without straddling "
                              f"({num_nodes} nodes × {ranks_per_node} ranks): make tp divide "
                              f"{ranks_per_node} or reorder instance sizes")
        if shared and n <= ranks_per_node:
            raise LayoutError(f"{what} (tp={n}) would put two TP ranks on one GPU "
                              f"({gpus_per_node} GPUs per node, {ranks_per_node} ranks per node): "
                              f"launch at most {gpus_per_node} ranks per node")
        if not dep.allow_cross_node_instances:
            raise LayoutError(f"{what} needs {n} ranks but a node has {unit}: lower tp "
                              f"or set deployment.allow_cross_node_instances=true")
        if n % unit:
            raise LayoutError(f"{what} spans nodes with {n} ranks: make it a multiple "
                              f"of {unit} ranks per node")
        span = n // unit
        need = ranks_per_node if not shared else unit
        for node in range(num_nodes - span + 1):
            if all(free[k] >= need for k in range(node, node + span)):
                return [r for k in range(node, node + span) for r in grab(k, unit)]
        raise LayoutError(f"{what} needs {span} empty nodes in a row; none left")

    if not dep.frontend_shares_rank:
        slots.append((take(1, FRONTEND)[0], FRONTEND, -1, 0, 1, 1))
    order = sorted(dep.groups, key=lambda g: -dep.group(g).tp) if shared else dep.groups
    for g in order:
        gc = dep.group(g)
        for inst in range(gc.instances):
            ranks = take(gc.tp, f"{g} instance {inst}")
            slots += [(r, g, inst, i, gc.tp, gc.ep) for i, r in enumerate(ranks)]

    slots.sort()
    ranks = [RankInfo(rank=r, world_size=world_size, role=role, instance=inst,
                      rank_in_instance=tp_rank, tp=tp, node=r // ranks_per_node,
                      local_rank=r % ranks_per_node,
                      device=(r % ranks_per_node) % gpus_per_node
                      if gpus_per_node and role != FRONTEND else -1,
                      hosts_frontend=(r == 0), ep=ep)
             for r, role, inst, tp_rank, tp, ep in slots]
    if gpus_per_node:
        per_instance: dict[tuple[str, int], list[RankInfo]] = {}
        for info in ranks:
            if info.instance >= 0 and info.tp > 1:
                per_instance.setdefault((info.role, info.instance), []).append(info)
        for (role, inst), members in per_instance.items():
            if len({(m.node, m.device) for m in members}) < len(members):
                raise LayoutError(f"{role} instance {inst} (tp={members[0].tp}) would put two "
                                  f"TP ranks on one GPU ({gpus_per_node} GPUs per node, "
                                  f"{ranks_per_node} ranks per node): launch at most "
                                  f"{gpus_per_node} ranks per node")
    layout = Layout(world_size, ranks_per_node, dep.name, ranks, dep)
    layout._validate()
    return layout


def _check_experts(dep: DeploymentConfig, num_experts: int | None) -> None:
    """ep (TensorRT-LLM's moe_expert_parallel_size) splits an instance's tp ranks into ep
    groups of whole experts: it must divide tp and the experts; a dense model takes ep=1."""
    for g in dep.groups:
        gc = dep.group(g)
        if gc.ep == 1:
            continue
        if g not in _TP_GROUPS:
            raise LayoutError(f"deployment.{g}.ep={gc.ep}: the {g} group runs no MoE layers, "
                              f"use ep=1")
        if gc.tp % gc.ep:
            raise LayoutError(f"deployment.{g}.ep={gc.ep} does not divide deployment.{g}.tp="
                              f"{gc.tp}: ep groups split the instance's tp ranks")
        if num_experts == 0:
            raise LayoutError(f"deployment.{g}.ep={gc.ep} needs a mixture-of-experts model; this "
                              f"one is dense: use ep=1")
        if num_experts and num_experts % gc.ep:
            ok = [e for e in range(1, gc.tp + 1) if gc.tp % e == 0 and num_experts % e == 0]
            raise LayoutError(f"deployment.{g}.ep={gc.ep} does not divide the model's "
                              f"{num_experts} experts: use ep in {ok}")


WEIGHT_SHARE = 0.9        # of a GPU's memory, at most, for weights (the rest: KV, activations)


def _check_memory(dep: DeploymentConfig, params: tuple[int, int], itemsize: int,
                  gpu_memory_gb: float, num_heads: int | None, num_kv_heads: int | None) -> None:
    """A rank of a tp-rank instance holds 1/tp of the text weights (attention, dense layers
    and its experts), plus the vision tower where it encodes: it must fit in a GPU."""
    text, vision = (p * itemsize / 1e9 for p in params)
    room = gpu_memory_gb * WEIGHT_SHARE
    for g in dep.groups:
        gc = dep.group(g)
        if not gc.instances:
            continue
        own = vision if g in ("encode", "aggregated") or (g == "prefill" and "encode" not in
                                                          dep.groups) else 0.0
        need = own + (text / gc.tp if g in _TP_GROUPS else 0.0)
        if need <= room:
            continue
        fits = [t for t in range(gc.tp + 1, 4097) if text / t + own <= room
                and (not num_heads or num_heads % t == 0)
                and (not num_kv_heads or num_kv_heads % t == 0 or t % num_kv_heads == 0)]
        hint = f"it needs {fits[0]} ranks an instance (deployment.{g}.tp={fits[0]})" if fits \
            else "no tp fits"
        raise LayoutError(f"deployment.{g}: a rank of tp={gc.tp} holds {need:.1f} GB of the "
                          f"model's {text + vision:.0f} GB of weights, more than "
                          f"{WEIGHT_SHARE:.0%} of a {gpu_memory_gb:g} GB GPU: {hint}")


def _check_heads(dep: DeploymentConfig, num_heads: int | None, num_kv_heads: int | None) -> None:
    for g in dep.groups:
        tp = dep.group(g).tp
        if g not in _TP_GROUPS or tp == 1:
            continue
        if num_heads is not None and num_heads % tp:
            ok = [t for t in range(1, num_heads + 1) if num_heads % t == 0]
            raise LayoutError(f"deployment.{g}.tp={tp} does not divide the model's {num_heads} "
                              f"attention heads: use tp in {ok}")
        # GQA: KV heads are split (kv % tp == 0) or replicated (tp % kv == 0).
        if num_kv_heads is not None and num_kv_heads % tp and tp % num_kv_heads:
            raise LayoutError(f"deployment.{g}.tp={tp} neither divides nor is a multiple of the "
                              f"model's {num_kv_heads} KV heads")

"""`python -m mmhpc [hydra overrides] [--dry-run [--world-size N]] [--cfg job]`.

Start-up, in order (every failure before `run` is ONE line from rank 0 and exit code 2 on
every rank, never a hang):
1. compose the config (Hydra compose API; no chdir), `--cfg job` prints it, `--dry-run`
   prints the layout table: neither imports torch nor MPI;
2. MPI (mpi4py; a singleton works), JobEnv, the layout, validated before any model loads;
3. one aggregated instance: `mmhpc.server.app.serve(config, LocalEngineClient(engine))`, the
   engine from `engine.interface.make_engine` (LLMEngine, or the transformers backend);
4. otherwise each rank binds its mailbox, makes its NIXL agent, runs `mmhpc.roles.<role>.setup`
   (optional: load the model, register pools), then ONE allgather of (ZeroMQ address, NIXL
   metadata, error), loads the peers' metadata, barrier, and `mmhpc.roles.<role>.run(ctx)`.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from mmhpc.launch.hydra import ConfigError, compose_dictconfig, to_config
from mmhpc.launch.layout import Layout, LayoutError, make_layout

EXIT_USAGE = 2
USAGE = ("usage: python -m mmhpc [key=value ...] [--dry-run [--world-size N]] [--cfg job]\n"
         "  e.g. mpirun -n 4 python -m mmhpc deployment=e_p_d model=tiny_llava\n"
         "       python -m mmhpc cluster=h200 cluster.nodes=4 --dry-run")


class UsageError(ValueError):
    pass


def parse_args(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    opts: dict[str, Any] = {"dry_run": False, "cfg": None, "world_size": None, "help": False}
    overrides: list[str] = []
    it = iter(argv)
    for a in it:
        key, eq, val = a.partition("=")
        if a in ("-h", "--help"):
            opts["help"] = True
        elif a == "--dry-run":
            opts["dry_run"] = True
        elif key in ("--cfg", "-c"):
            opts["cfg"] = val if eq else next(it, "")
            if opts["cfg"] != "job":
                raise UsageError(f"--cfg takes 'job', got {opts['cfg']!r}")
        elif key == "--world-size":
            val = val if eq else next(it, "")
            if not val.isdigit() or int(val) < 1:
                raise UsageError(f"--world-size takes a positive integer, got {val!r}")
            opts["world_size"] = int(val)
        elif a.startswith("-"):
            raise UsageError(f"unknown option {a!r}")
        else:
            overrides.append(a)
    return opts, overrides


_exit_hard = False          # exit_fast: finalize MPI and os._exit (aggregated TP ranks)


def exit_fast(rc: int) -> None:
    """Exit with `rc`, without the interpreter's slow teardown. With torch, transformers, a
    model and NIXL loaded, finalization's garbage collection over millions of objects takes
    seconds per rank, far longer with several ranks on a busy node: a job that had drained on
    scancel was then SIGKILLed at Slurm's KillWait. Freezing the heap first leaves that
    collection nothing to walk. A rank of an aggregated TP > 1 instance then finalizes MPI
    and leaves with `os._exit`: the C++ destructors that ran at exit aborted such a rank after
    a clean stop ("terminate called without an active exception"; one stop in ten on a
    loaded 2-core machine, none in 50 after). Other ranks exit as before: leaving that way,
    E/P/D ranks (TP or not) hung their teardowns past the tests' 20-30 s."""
    import gc
    gc.freeze()
    mpi = sys.modules.get("mpi4py.MPI")
    if _exit_hard and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        import logging
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        mpi.Finalize()
        os._exit(int(rc or 0))
    sys.exit(rc)


def _fail(msg: str, rank: int = 0) -> int:
    if rank == 0:
        print(f"mmhpc: error: {msg}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def model_heads(path: str) -> dict[str, int]:
    """num_heads / num_kv_heads / num_experts (0: dense) of the text model from config.json,
    when the file is there (`tiny:<family>`: the builder's default sizes, before anything is
    built; `arch:<name>`: the built-in config values)."""
    if path.startswith("tiny:"):
        from mmhpc.tools.tiny import default_sizes
        try:
            sizes = default_sizes(path.split(":", 1)[1])
        except ValueError:
            sizes = {}
        return {"num_heads": sizes["heads"], "num_kv_heads": sizes["kv_heads"],
                "num_experts": sizes.get("experts", 0)} if sizes else {}
    if path.startswith("arch:"):
        from mmhpc.models.arch import ARCHS
        cfg = ARCHS.get(path.split(":", 1)[1], {}).get("config", {})
    else:
        try:
            cfg = json.loads((Path(path) / "config.json").read_text())
        except (OSError, ValueError):
            return {}
    text = cfg.get("text_config") or cfg
    heads = text.get("num_attention_heads") or cfg.get("num_attention_heads")
    kv = text.get("num_key_value_heads") or cfg.get("num_key_value_heads") or heads
    experts = text.get("num_local_experts") or text.get("num_experts") or 0
    if not heads:
        return {}
    return {"num_heads": heads, "num_kv_heads": kv, "num_experts": experts,
            "params": _num_params(text, cfg.get("vision_config") or {})}


def _num_params(text: dict, vision: dict) -> tuple[int, int]:
    """(text, vision) parameter counts estimated from config values: Llama-style attention,
    dense SwiGLU or MoE layers (routed + shared experts), embeddings and head; the vision
    tower's attention and MLP. Enough to tell whether a layout's ranks hold the weights."""
    try:
        h, layers, vocab = text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]
        heads = text["num_attention_heads"]
        kv = text.get("num_key_value_heads") or heads
        d = text.get("head_dim") or h // heads
        attn = h * d * (2 * heads + 2 * kv)
        inter = text["intermediate_size"]
        experts = text.get("num_local_experts") or 0
        step = text.get("interleave_moe_layer_step") or 1
        moe_layers = len(range(step - 1, layers, step)) if experts else 0
        moe = 3 * h * inter * (experts + 1) + h * experts
        dense = 3 * h * text.get("intermediate_size_mlp", inter)
        total = layers * attn + moe_layers * moe + (layers - moe_layers) * dense + 2 * vocab * h
        vh = vision.get("hidden_size") or vision.get("embed_dim") or 0
        vi = vision.get("intermediate_size") or 4 * vh
        vis = (vision.get("num_hidden_layers") or vision.get("depth") or 0) * (4 * vh * vh + 2 * vh * vi)
        return int(total), int(vis)
    except (KeyError, TypeError):
        return 0, 0


def resolve_model_path(config) -> None:
    """`tiny:<family>` paths: build (once, cached) the tiny checkpoint now."""
    if config.model.path.startswith("tiny:"):
        from mmhpc.tools.tiny import tiny_checkpoint
        config.model.path = str(tiny_checkpoint(config.model.path.split(":", 1)[1]))


def node_lines(per_rank: list[tuple[int, str, str, str]]) -> str:
    """One line per node: its name, ranks and the address it chose (and why)."""
    nodes: dict[int, list] = {}
    for rank, (index, name, addr, via) in enumerate(per_rank):
        nodes.setdefault(index, [name, addr, via, []])[3].append(rank)
    return "\n".join(f"mmhpc: node {i} {name}: ranks {_span(ranks)} at {addr} ({via})"
                     for i, (name, addr, via, ranks) in sorted(nodes.items()))


def _span(ranks: list[int]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else \
        f"{ranks[0]}-{ranks[-1]}" if ranks == list(range(ranks[0], ranks[-1] + 1)) \
        else ",".join(map(str, ranks))


def _dry_run(config, world_size: int | None) -> str:
    """The layout table and this node's address for cluster.interface; under a launcher of
    several ranks (mpirun, srun), the launcher's world and every node's address choice."""
    from mmhpc.launch.address import AddressError, node_address
    from mmhpc.launch.env import JobEnv, job_address
    env = JobEnv.from_environ(host_addr="-")
    if env.world_size > 1 and world_size is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        job = JobEnv.from_mpi(comm, host_addr="-")          # collective: where ranks run
        try:
            got = (job.node_index, job.node_name,
                   *job_address(os.environ, config.cluster.host_addr or None,
                                config.cluster.interface, job.num_nodes, job.node_name)[:2])
        except AddressError as e:
            got = (job.node_index, job.node_name, "-", str(e))
        per_rank = comm.allgather(got)
        if comm.rank:
            return ""
        cl = config.cluster
        layout = make_layout(comm.size, job.ranks_per_node, config.deployment,
                             gpus_per_node=cl.gpus_per_node, **model_heads(config.model.path))
        return layout.table() + node_lines(per_rank) + "\n"
    table = dry_run_layout(config, world_size).table()
    try:
        here = str(node_address(config.cluster.interface, single_node=config.cluster.nodes == 1
                                and not config.cluster.interface))
    except AddressError as e:
        here = f"none: {e}"
    return table + f"address of this node ({env.node_name}): {here}\n"


def dry_run_layout(config, world_size: int | None) -> Layout:
    cl = config.cluster
    ws = world_size or cl.world_size or config.deployment.num_ranks
    # --world-size beyond the GPUs: ranks share GPUs, spread evenly over the nodes
    rpn = -(-ws // cl.nodes) if world_size or not cl.gpus_per_node else cl.gpus_per_node
    return make_layout(ws, rpn, config.deployment, gpus_per_node=cl.gpus_per_node,
                       **model_heads(config.model.path), **_memory(config))


def _memory(config) -> dict:
    """What make_layout needs to check that ranks hold the weights (GPU clusters that state
    `cluster.gpu_memory_gb`)."""
    itemsize = 4 if config.model.dtype == "float32" else 2
    return {"gpu_memory_gb": config.cluster.gpu_memory_gb, "bytes_per_param": itemsize}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, overrides = parse_args(argv)
    except UsageError as e:
        return _fail(f"{e} (see python -m mmhpc --help)")
    if opts["help"]:
        print(USAGE)
        return 0
    try:
        dcfg = compose_dictconfig(overrides)
        if opts["cfg"] == "job":
            from omegaconf import OmegaConf
            print(OmegaConf.to_yaml(dcfg), end="")
            return 0
        config = to_config(dcfg)
        if opts["dry_run"]:
            print(_dry_run(config, opts["world_size"]), end="")
            return 0
    except (ConfigError, LayoutError) as e:
        return _fail(str(e))
    return _run(config)


def _run(config) -> int:
    from mpi4py import MPI

    from mmhpc.launch.env import JobEnv
    t0 = time.monotonic()
    comm = MPI.COMM_WORLD
    err = None
    try:
        job = JobEnv.from_mpi(comm, host_addr=config.cluster.host_addr or None,
                              interface=config.cluster.interface)
    except ValueError as e:            # AddressError: no address on cluster.interface
        job, err = None, str(e)
    try:
        if job is None:
            raise LayoutError(err)
        from mmhpc.launch.env import use_interface
        use_interface(job)
        layout = make_layout(comm.size, job.ranks_per_node, config.deployment,
                             gpus_per_node=config.cluster.gpus_per_node,
                             **model_heads(config.model.path), **_memory(config))
        info = layout[comm.rank]
        config.deployment = layout.deployment_config     # `auto` instances filled in
        if (info.node, info.local_rank) != (job.node_index, job.local_rank):
            raise LayoutError(f"rank {comm.rank} runs on node {job.node_index} as local rank "
                              f"{job.local_rank}, the layout expects blocks of "
                              f"{layout.ranks_per_node} ranks per node: launch with "
                              f"srun --distribution=block or mpirun --map-by core")
    except (LayoutError, ValueError) as e:
        err = str(e)
    gathered = comm.allgather((err, job and (job.node_index, job.node_name, job.host_addr,
                                             job.host_via)))
    errors = [e for e, _ in gathered if e]
    if errors:
        return _fail(errors[0], comm.rank)
    if comm.rank == 0:
        print(node_lines([n for _, n in gathered]), flush=True)

    try:
        if layout.instances("aggregated") == [list(range(comm.size))]:   # one agg instance, any tp
            return _serve_aggregated(config, comm, job, layout)
        return _run_role(config, comm, job, layout, [n[1] for _, n in gathered], t0)
    except SystemExit:
        raise
    except BaseException:
        # A rank that dies alone would leave the others waiting: take the job down.
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
        return 1


def _serve_aggregated(config, comm, job, layout: Layout) -> int:
    """Rank 0: HTTP + LLMEngine (the TP leader); ranks 1..tp-1: TP followers."""
    import asyncio
    info = layout[comm.rank]
    try:
        resolve_model_path(config)
        from mmhpc.engine.interface import make_engine
        from mmhpc.engine.tp_worker import follow, start_tp, stop_followers
        from mmhpc.server.app import serve
        from mmhpc.server.engine_client import LocalEngineClient
    except ImportError as e:
        return _fail(f"aggregated serving is not available: {e}")
    from mmhpc.distributed.group import destroy_tp_group
    tp = start_tp(comm, info, job.host_addr, config.timeouts.collective_s)
    global _exit_hard
    _exit_hard = tp.size > 1
    if not tp.is_leader:
        follow(config)
        destroy_tp_group()      # gloo's threads joined now, not torn down at interpreter exit
        return 0
    from mmhpc.models.loader import reporting
    with reporting(load_label(layout, info, job)):
        engine = make_engine(config, "aggregated", device=tp.device)  # a failure: _run aborts

    try:
        from mmhpc.launch.url_file import write_url_file
        asyncio.run(serve(config, LocalEngineClient(engine), engine.processor,
                          on_ready=write_url_file, note=layout.summary()))
    finally:
        stop_followers()
    destroy_tp_group()
    return 0


def load_label(layout: Layout | None, info, job) -> str | None:
    """Who prints weight-loading progress: rank 0 of each group's first instance (the others
    of the group load alike), as 'prefill rank 2 on node0 (1 of 2 instances, tp 2)'."""
    if info.instance != 0 or info.rank_in_instance != 0:
        return None
    n = len(layout.instances(info.role)) if layout is not None else 1
    return (f"{info.role} rank {info.rank} on {job.node_name} "
            f"({'1 of ' + str(n) + ' instances, ' if n > 1 else ''}tp {info.tp})")


_UP_TAG = 2400
WAIT_LINE_EVERY_S = 10.0


def wait_for_ranks(comm, layout: Layout, nodes: list[str], startup_s: float,
                   t0: float) -> str | None:
    """Every rank tells rank 0 it is set up (model loaded, pools registered); rank 0 waits
    until `t0 + startup_s` (timeouts.startup_s), saying every WAIT_LINE_EVERY_S which ranks
    it still waits for. Returns, on rank 0, the line naming the ranks not up in time."""
    if comm.rank:
        comm.isend(True, dest=0, tag=_UP_TAG).wait()
        return None
    waiting = {r: comm.irecv(source=r, tag=_UP_TAG) for r in range(1, comm.size)}
    said = time.monotonic()
    while waiting:
        waiting = {r: q for r, q in waiting.items() if not q.test()[0]}
        now = time.monotonic()
        if waiting and now > t0 + startup_s:
            return (f"{_ranks_named(layout, nodes, waiting)} not up after {startup_s:.0f} s "
                    f"(timeouts.startup_s): still loading, or hung; stopping the job")
        if waiting and now - said > WAIT_LINE_EVERY_S:
            said = now
            print(f"mmhpc: waiting for {_ranks_named(layout, nodes, waiting)} to come up "
                  f"({now - t0:.0f} s of timeouts.startup_s={startup_s:.0f})", flush=True)
        time.sleep(0.05)
    return None


def _ranks_named(layout: Layout, nodes: list[str], ranks) -> str:
    names = [f"{r} ({layout[r].role} on {nodes[r]})" for r in sorted(ranks)]
    return ("rank " if len(names) == 1 else "ranks ") + ", ".join(names)


def _import_role(role: str):
    name = f"mmhpc.roles.{role}"
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as e:
        if e.name not in (name, "mmhpc.roles"):
            raise
        return None, f"role {role!r} is not implemented yet (no module {name})"


def _run_role(config, comm, job, layout: Layout, nodes: list[str], t0: float) -> int:
    from mmhpc.launch.context import Peer, RuntimeContext
    from mmhpc.transport.zmq_io import AsyncMailbox, Mailbox
    import mmhpc.messages  # noqa: F401  (registers every message with the codec)

    info = layout[comm.rank]
    port = config.cluster.zmq_port_base + comm.rank if config.cluster.zmq_port_base else 0
    mailbox = (AsyncMailbox if info.hosts_frontend else Mailbox)(comm.rank, job.host_addr, port)
    ctx = RuntimeContext(config, job, layout, info, mailbox, comm=comm)

    from mmhpc.engine import tp_worker
    tp = tp_worker.start_tp(comm, info, job.host_addr,   # every rank: TP groups per instance
                            config.timeouts.collective_s)
    # TP ranks > 0 follow their leader (tp_worker.setup / run) instead of running the role
    module, err = (tp_worker, None) if not tp.is_leader else _import_role(info.role)
    metadata = b""
    if err is None:
        try:
            if info.role != "frontend":
                from mmhpc.transport.nixl_agent import NixlAgent
                ctx.nixl = NixlAgent(f"mmhpc-r{comm.rank}")
            resolve_model_path(config)
            if hasattr(module, "setup"):
                from mmhpc.models.loader import reporting
                with reporting(load_label(layout, info, job)):
                    module.setup(ctx)     # load the model, register NIXL pools
            metadata = ctx.nixl.metadata() if ctx.nixl else b""
        except Exception as e:
            traceback.print_exc()
            err = f"rank {comm.rank} ({info.role}) failed to start: {type(e).__name__}: {e}"

    late = wait_for_ranks(comm, layout, nodes, config.timeouts.startup_s, t0)
    if late:
        print(f"mmhpc: error: {late}", file=sys.stderr, flush=True)
        time.sleep(0.5)                     # the line reaches the launcher before the abort
        comm.Abort(1)
    book = comm.allgather((mailbox.address, ctx.nixl.name if ctx.nixl else None, metadata,
                           job.node_name, err, tp_worker.pool_of(ctx) if err is None else None))
    errors = [b[4] for b in book if b[4]]
    if errors:
        mailbox.close()
        return _fail(errors[0], comm.rank)
    ctx.peers = [Peer(r, layout[r].role, layout[r].instance, layout[r].rank_in_instance,
                      addr, agent, node) for r, (addr, agent, _, node, *_) in enumerate(book)]
    if info.instance >= 0:      # KV pools of this instance's TP ranks, TP rank order
        ctx.tp_pools = [book[r][5] for r in ctx.instance_ranks()]
    mailbox.set_peers([p.address for p in ctx.peers])
    if ctx.nixl:
        for r, (_, agent, md, *_) in enumerate(book):
            if agent and r != comm.rank:
                ctx.nixl.add_peer(md)
    comm.Barrier()
    try:
        module.run(ctx)
    finally:
        if tp.is_leader:
            tp_worker.stop_followers()
        mailbox.close()
        if ctx.nixl:
            ctx.nixl.close()
    return 0

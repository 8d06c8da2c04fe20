"""TP followers: ranks 1.. of a tensor-parallel instance.

The instance leader (TP rank 0) owns the LLMEngine (scheduler, sampler, encoder, I/O);
its ModelRunner broadcasts each step's `StepInputs` over the TP group's gloo group and every
rank runs the sharded forward together (all-reduce after row-parallel layers, all-gather of
the vocabulary-parallel logits). A follower only loads its shard, allocates its KV pool
(its KV heads; the same number of blocks as the leader) and repeats:

    step = broadcast_object()   # from the leader; None: shut down
    runner.run_step(step)

Roles start followers with ONE call at start-up, after the launcher split the job:

    tp = start_tp(comm, info, host_addr)       # every rank of the job (collective over comm)
    if tp.is_leader: ...LLMEngine(config)...; stop_followers() when done
    else:            follow(config, device)    # returns after the leader's stop_followers()
"""
from __future__ import annotations

import logging

from mmhpc.config import Config
from mmhpc.distributed.group import (COLLECTIVE_TIMEOUT_S, KEEPALIVE, TPGroup, get_tp,
                                     init_tp_group)

log = logging.getLogger(__name__)


def start_tp(comm, info, host_addr: str, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> TPGroup:
    """The TP group of `info`'s instance (a launch RankInfo); collective over `comm`. Ranks
    in no instance (a frontend-only rank 0) get a size-1 group. `timeout_s`: a collective
    stuck that long raises (timeouts.collective_s)."""
    color = -1
    if info.instance >= 0:
        roles = ("frontend", "encode", "prefill", "decode", "aggregated")
        color = roles.index(info.role) * 100_000 + info.instance
    device = "cpu" if info.device < 0 else f"cuda:{info.device}"
    tp = info.tp if info.instance >= 0 else 1
    return init_tp_group(comm, color, info.rank_in_instance, tp, host_addr, device,
                         ep=getattr(info, "ep", 1) if info.instance >= 0 else 1,
                         timeout_s=timeout_s)


def make_runner(config: Config, device=None, allocate_kv: bool = True):
    from mmhpc.engine.model_runner import ModelRunner
    return ModelRunner(config, device=device or get_tp().device, allocate_kv=allocate_kv)


class FollowerTask:
    """Work other than a model step that the leader broadcasts (e.g. `KVPull`)."""

    def run(self, ctx, runner) -> None:
        raise NotImplementedError


def follow(config: Config, device=None, runner=None, ctx=None) -> None:
    """A follower's loop (TP rank > 0): run the leader's steps until it says stop."""
    tp = get_tp()
    assert not tp.is_leader, "the TP leader runs the engine, not follow()"
    runner = runner or make_runner(config, device)
    _leave_signals_to_leader()
    num_steps = 0
    while True:
        step = tp.broadcast_object()
        if step is None:
            break
        if step == KEEPALIVE:
            continue
        if isinstance(step, FollowerTask):
            step.run(ctx, runner)
        else:
            runner.run_step(step)
            num_steps += 1
    log.info("TP rank %d/%d: stopped after %d steps", tp.rank, tp.size, num_steps)


def _leave_signals_to_leader() -> None:
    """mpirun / srun deliver SIGTERM (SIGINT) to every rank: the leader drains its requests
    and then stops its followers, so a follower must not die first (that would fail the
    step collectives under the draining requests and the job's exit code)."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


def stop_followers() -> None:
    """Leader: end the followers' loops (call once, after the engine's last step)."""
    tp = get_tp()
    if tp.size > 1 and tp.is_leader:
        tp.broadcast_object(None)


# ---- roles: TP ranks > 0 of a prefill / decode instance ------------------------------------
# The launcher runs `setup` / `run` below instead of the role's own on those ranks; the
# leader's role code is unchanged except for the pools it advertises (`ctx.tp_pools`, one per
# TP rank, exchanged in the start-up allgather) and the KV pull (`start_kv_pull`).

def setup(ctx) -> None:
    """Load this rank's shard, allocate and register its KV pool (peers READ / write it)."""
    ctx.runner = make_runner(ctx.config, ctx.device)
    ctx.kv_pool_descs = ctx.nixl.register(ctx.runner.kv_cache)


def run(ctx) -> None:
    import threading
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeats, args=(ctx, stop), daemon=True)
    beat.start()
    try:
        follow(ctx.config, runner=ctx.runner, ctx=ctx)
    finally:
        stop.set()
        beat.join(5.0)


def _heartbeats(ctx, stop) -> None:
    """The frontend watches every worker rank: tell it this follower lives (the thread owns
    the mailbox; what arrives, e.g. Shutdown, is the leader's business)."""
    import os
    import time
    from mmhpc.messages.common import Heartbeat
    while not stop.is_set():
        try:
            ctx.mailbox.recv_all(0.0)
            ctx.mailbox.send(ctx.layout.frontend_rank, Heartbeat(ctx.rank, ctx.role, time.time(),
                                                                {"pid": os.getpid()}))
        except Exception:  # noqa: BLE001
            log.exception("TP follower rank %d: heartbeat failed", ctx.rank)
        stop.wait(ctx.config.timeouts.heartbeat_s)


def pool_of(ctx):
    """This rank's registered KV pool descriptors (None: it has none)."""
    pool = getattr(ctx, "kv_pool_descs", None)
    return pool if pool is not None else getattr(getattr(ctx, "worker", None), "pool_descs", None)


class KVPull(FollowerTask):
    """Pull a request's KV blocks from the prefill instance's TP ranks (`src_pools[i]`: rank
    i's pool) into `dst_blocks` of this rank's pool: ONE READ per prefill rank that holds
    heads this rank needs (`mmhpc.distributed.kv_layout.plan_tp_reads`)."""

    def __init__(self, request_id: str, num_kv_heads: int, src_pools, src_blocks, dst_blocks,
                 deadline: float):
        self.request_id = request_id
        self.num_kv_heads = num_kv_heads
        self.src_pools, self.src_blocks, self.dst_blocks = src_pools, src_blocks, dst_blocks
        self.deadline = deadline

    def start(self, ctx, kv_cache, pool) -> list:
        from mmhpc.distributed.kv_layout import plan_tp_reads
        tp = get_tp()
        num_layers, _, _, _, block_size, head_dim = kv_cache.shape
        reads = plan_tp_reads(self.num_kv_heads, self.src_pools, self.src_blocks, pool,
                              self.dst_blocks, tp.size, tp.rank, num_layers=num_layers,
                              block_size=block_size, head_dim=head_dim,
                              itemsize=kv_cache.element_size())
        return [ctx.nixl.read(local, remote) for _, local, remote in reads]

    def run(self, ctx, runner) -> None:
        """Follower: READ and wait (a failure is remembered for the leader's `Sync`); the
        leader's next broadcast comes after."""
        import time
        if _PULL_DELAY_S:
            time.sleep(_PULL_DELAY_S)
        try:
            if _PULL_FAIL:
                raise RuntimeError("MMHPC_TEST_FOLLOWER_PULL_FAIL is set")
            for h in self.start(ctx, runner.kv_cache, ctx.kv_pool_descs):
                ctx.nixl.wait(h, timeout=max(0.0, self.deadline - time.time()))
        except Exception:  # noqa: BLE001
            log.exception("TP rank %d: KV pull of %s failed", get_tp().rank, self.request_id)
            _FAILED_PULLS.add(self.request_id)


# Fault injection for tests: followers start their READs this late (a slow rank), or fail them.
_PULL_DELAY_S = float(__import__("os").environ.get("MMHPC_TEST_FOLLOWER_PULL_DELAY_S", "0"))
_PULL_FAIL = __import__("os").environ.get("MMHPC_TEST_FOLLOWER_PULL_FAIL") == "1"
_FAILED_PULLS: set[str] = set()        # follower: pulls that failed, until a Sync asks


class Sync(FollowerTask):
    """A barrier: has every TP rank pulled these requests' KV? (The follower has finished
    every task broadcast before this one.)"""

    def __init__(self, request_ids: list[str]):
        self.request_ids = request_ids

    def run(self, ctx, runner) -> None:
        failed = [r for r in self.request_ids if r in _FAILED_PULLS]
        _FAILED_PULLS.difference_update(failed)
        get_tp().min_int(0 if failed else 1)


def sync_followers(request_ids: list[str]) -> bool:
    """Leader: return once every follower has finished what was broadcast before (e.g. its
    `KVPull` READs: only then may the prefill rank reuse the blocks they read). False: a
    follower's pull of one of `request_ids` failed (its KV there is not valid)."""
    tp = get_tp()
    if tp.size == 1 or not tp.is_leader:
        return True
    tp.broadcast_object(Sync(list(request_ids)))
    return tp.min_int(1) == 1


def start_kv_pull(ctx, engine, pool, request_id, src_pools, src_blocks, dst_blocks,
                  deadline) -> list:
    """Decode leader: start this rank's READs (handles returned: poll each) and have the
    followers do theirs."""
    task = KVPull(request_id, engine.num_kv_heads, list(src_pools),
                  list(src_blocks), list(dst_blocks), deadline)
    get_tp().broadcast_object(task)
    return task.start(ctx, engine.kv_cache, pool)

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
from mmhpc.distributed.group import TPGroup, get_tp, init_tp_group

log = logging.getLogger(__name__)


def start_tp(comm, info, host_addr: str) -> TPGroup:
    """The TP group of `info`'s instance (a launch RankInfo); collective over `comm`. Ranks
    in no instance (a frontend-only rank 0) get a size-1 group."""
    color = -1
    if info.instance >= 0:
        roles = ("frontend", "encode", "prefill", "decode", "aggregated")
        color = roles.index(info.role) * 100_000 + info.instance
    device = "cpu" if info.device < 0 else f"cuda:{info.device}"
    tp = info.tp if info.instance >= 0 else 1
    return init_tp_group(comm, color, info.rank_in_instance, tp, host_addr, device)


def make_runner(config: Config, device=None, allocate_kv: bool = True):
    from mmhpc.engine.model_runner import ModelRunner
    return ModelRunner(config, device=device or get_tp().device, allocate_kv=allocate_kv)


def follow(config: Config, device=None, runner=None) -> None:
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

"""Failure paths under real `mpirun` (E/P/D, tiny LLaVA, one deployment for the module):
a request past its deadline gets an error and frees its blocks everywhere; killing the decode
rank mid-stream fails the clients, the frontend prints one line naming the rank and its role,
and the job exits non-zero within 30 s leaving no process behind."""
from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mpi_helpers import ROOT, Deployment

OVERRIDES = ["model=tiny_llava", "deployment=e_p_d", "server.request_timeout_s=3",
             "timeouts.heartbeat_s=0.5", "timeouts.dead_rank_s=3"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    # MPICH's mpiexec kills every rank itself as soon as one dies (before mmhpc can name it).
    # -disable-auto-cleanup leaves that to mmhpc's frontend (one line, then MPI_Abort), but only
    # for a rank that exits: one that a signal killed still makes the launcher SIGKILL the rest
    # the moment it reaps it (1 run in 10 here, before the frontend printed its line).
    # bin/mmhpc-rank, as the README says, turns that death into an exit status.
    dep = Deployment(4, OVERRIDES, tmp_path_factory.mktemp("failure") / "job.log",
                     mpirun_args=("-disable-auto-cleanup",),
                     rank_wrapper=(str(ROOT / "bin" / "mmhpc-rank"),)).start()
    yield dep
    dep.stop()


def _client(dep):
    from openai import OpenAI
    return OpenAI(base_url=dep.url + "/v1", api_key="x", max_retries=0, timeout=60)


def _long(client, model: str):
    # n=8: 16 requests are 128 sequences, far more decode work than fits in the 3 s deadline
    # however fast the engine gets.
    return client.completions.create(model=model, prompt="Count: 1 2 3", max_tokens=480, n=8,
                                     temperature=0, extra_body={"ignore_eos": True})


def _kv_ranks(dep):
    return [s for s in dep.ranks().values() if s["role"] in ("prefill", "decode")]


def test_deadline_frees_blocks(deployment):
    import openai
    client = _client(deployment)
    model = client.models.list().data[0].id
    with ThreadPoolExecutor(16) as pool:
        futs = [pool.submit(_long, client, model) for _ in range(16)]
    errors = [f.exception() for f in futs if f.exception() is not None]
    assert errors, "no request reached its 3 s deadline"
    assert all(isinstance(e, openai.APIStatusError) and e.status_code in (500, 504)
               for e in errors), errors
    end = time.monotonic() + 15
    while time.monotonic() < end:
        kv = _kv_ranks(deployment)
        if all(s["num_running"] == 0 and not s.get("num_retained") and not s.get("num_pulling")
               and s["num_free_blocks"] + s.get("num_cached_blocks", 0) >= s["num_total_blocks"]
               for s in kv):
            return
        time.sleep(0.5)
    pytest.fail(f"blocks not freed after the deadline: {_kv_ranks(deployment)}")


def test_kill_decode_mid_stream(deployment):
    client = _client(deployment)
    model = client.models.list().data[0].id
    decode_rank, decode_pid = next((r, s["pid"]) for r, s in deployment.ranks().items()
                                   if s["role"] == "decode")
    result: dict = {}

    def stream():
        try:
            for _ in client.completions.create(model=model, prompt="Count: 1 2 3", stream=True,
                                               max_tokens=480, temperature=0,
                                               extra_body={"ignore_eos": True}):
                result.setdefault("tokens", 0)
                result["tokens"] += 1
            result["finished"] = True
        except Exception as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=stream)
    t.start()
    end = time.monotonic() + 30
    while not result.get("tokens") and time.monotonic() < end:
        time.sleep(0.05)
    killed = time.monotonic()
    os.kill(decode_pid, signal.SIGKILL)
    rc = deployment.wait(30)
    t.join(30)
    assert rc is not None and rc != 0, "job did not exit non-zero within 30 s"
    assert time.monotonic() - killed <= 30
    assert "error" in result or not result.get("finished"), result
    # The frontend sees the closed connection before MPICH's launcher tears the job down:
    # ONE line naming the rank and its role.
    log = deployment.log()
    lines = [ln for ln in log.splitlines() if "is dead" in ln]
    assert len(lines) == 1 and f"rank {decode_rank} (decode)" in lines[0], log[-3000:]
    assert not deployment.leftover_pids(), "orphan processes after the job exited"

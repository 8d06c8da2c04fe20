"""Codec unit tests, and the transport under real `mpirun -n 2/3`: the start-up allgather of
ZeroMQ addresses + NIXL metadata, NIXL READs with notifications, ZMQ round trips, a read that
times out, and main's one-line failure on every rank."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mmhpc.messages  # noqa: F401
from mmhpc.engine.sequence import SamplingParams
from mmhpc.messages.common import AbortRequest, Heartbeat, MMItemMeta
from mmhpc.messages.to_decode import KVReady
from mmhpc.messages.to_frontend import TokenStream
from mmhpc.messages.to_prefill import EmbeddingsReady
from mmhpc.transport import codec
from mmhpc.transport.descs import NixlDescs
from mmhpc.transport.zmq_io import Mailbox

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")


def test_codec_round_trip_nested():
    m = KVReady("r1", [1, 2, 3], 7, SamplingParams(max_tokens=5, stop=["x"]), [4, 9], 3,
                ["mmhpc-r2"], [NixlDescs("mmhpc-r2", "VRAM", [[2**47, 4096, 1]])], 2,
                time.time() + 5, time.time() + 60,
                mm_items=[MMItemMeta("ab" * 32, 1, 4, [1, 2, 2])], mrope_delta=-3)
    src, back = codec.decode_envelope(codec.encode_envelope(3, m))
    assert src == 3 and back == m and isinstance(back.params, SamplingParams)
    assert isinstance(back.pools[0], NixlDescs) and back.pools[0].nbytes == 4096
    e = EmbeddingsReady("r", "h", NixlDescs("a"), 4, 64, "float32", 1, [1, 4, 4], 2)
    assert codec.decode(codec.encode(e)) == e


def test_codec_is_strict():
    raw = codec.encode(AbortRequest("r"))
    bad = raw.replace(b"AbortRequest", b"AbortRequesX")
    with pytest.raises(codec.CodecError, match="unknown message type 'AbortRequesX'"):
        codec.decode(bad)
    with pytest.raises(codec.CodecError, match="cannot encode"):
        codec.encode(TokenStream("r", [1], "decode", logprobs=[object()]))
    with pytest.raises(codec.CodecError, match="not a registered message"):
        codec.encode_envelope(0, {"x": 1})
    with pytest.raises(codec.CodecError):
        codec.decode(b"\xc1garbage")


def test_mailbox_in_process():
    a, b = Mailbox(0), Mailbox(1)
    try:
        for m in (a, b):
            m.set_peers([a.address, b.address])
        a.send(1, Heartbeat(0, "frontend", 1.0, {"num_running": 2}))
        assert b.recv(5) == (0, Heartbeat(0, "frontend", 1.0, {"num_running": 2}))
        assert b.recv(0.01) is None
    finally:
        a.close(), b.close()


class _FakeAgent:
    """Stands in for nixl_agent: a transfer that never completes."""
    released = 0

    def check_xfer_state(self, handle):
        return "PROC"


class _FakeHandle:
    def release(self):
        _FakeAgent.released += 1


def test_nixl_wait_times_out_and_releases():
    from mmhpc.transport.nixl_agent import NixlAgent, XferHandle
    agent = NixlAgent.__new__(NixlAgent)
    agent._agent = _FakeAgent()
    x = XferHandle(_FakeHandle(), "peer", "READ", 1 << 20, time.monotonic())
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="NIXL READ from peer of 1048576 bytes not done after"):
        agent.wait(x, timeout=0.05)
    assert 0.05 <= time.monotonic() - t0 < 1 and _FakeAgent.released == 1 and x.handle is None


WORKER = r'''
import sys, time, torch
from mpi4py import MPI
import mmhpc.messages
from mmhpc.launch.env import JobEnv
from mmhpc.messages.common import Heartbeat
from mmhpc.transport.nixl_agent import NixlAgent
from mmhpc.transport.zmq_io import Mailbox

comm = MPI.COMM_WORLD
r, n = comm.rank, comm.size
def _abort(*exc):
    sys.__excepthook__(*exc); sys.stderr.flush(); comm.Abort(1)
sys.excepthook = _abort   # a failing rank takes the job down instead of hanging the others
job = JobEnv.from_mpi(comm)
assert (job.rank, job.world_size, job.ranks_per_node, job.num_nodes) == (r, n, n, 1), job
box = Mailbox(r, job.host_addr)
agent = NixlAgent(f"t{r}")
small = torch.full((1024,), float(r))                      # 4 KiB
big = torch.zeros(8 * 1024 * 1024)                         # 32 MiB
d_small, d_big = agent.register(small), agent.register(big)
book = comm.allgather((box.address, agent.metadata(), d_small, d_big))
box.set_peers([b[0] for b in book])
for q, b in enumerate(book):
    if q != r:
        agent.add_peer(b[1])
comm.Barrier()

nxt, prv = (r + 1) % n, (r - 1) % n
# NIXL READ of the next rank's tensor into a local view, with a notification to it
dst = torch.empty(1024)
scratch = torch.zeros(2048)
agent.allow_late_registration(); agent.register(scratch)   # local-only: peers never read it
view = scratch[:1024]
h = agent.read(agent.descs(view), book[nxt][2], notif=f"read-by-{r}".encode())
agent.wait(h, timeout=10)
assert torch.equal(view, torch.full((1024,), float(nxt))), view[:4]
deadline = time.monotonic() + 10
got = {}
while f"t{prv}" not in got and time.monotonic() < deadline:
    for k, v in agent.get_notifs().items():
        got.setdefault(k, []).extend(v)
    time.sleep(0.001)
assert got.get(f"t{prv}") == [f"read-by-{prv}".encode()], got

# ZMQ round trip: ping the next rank, answer the previous one, get our pong back
box.send(nxt, Heartbeat(r, "ping", time.time()))
seen = []
while len(seen) < 2:
    src, msg = box.recv(10)
    seen.append((src, msg.role))
    if msg.role == "ping":
        box.send(src, Heartbeat(r, "pong", msg.time))
assert sorted(seen) == sorted([(prv, "ping"), (nxt, "pong")]), seen

# a READ that cannot finish by its deadline raises TimeoutError instead of hanging
if r == 0:
    # UCX may copy inside the post (then it is DONE at once); if it is still in flight,
    # a zero deadline must raise rather than wait.
    h = agent.read(agent.descs(big), book[nxt][3])
    t0 = time.monotonic()
    try:
        agent.wait(h, timeout=0.0)
        print("timeout-path: done at post", flush=True)
    except TimeoutError as e:
        assert "not done after" in str(e) and time.monotonic() - t0 < 1, e
        print("timeout-path: raised", flush=True)
    time.sleep(1.0)   # let the abandoned transfer drain before peers deregister
comm.Barrier()
box.close()
print(f"OK {r}", flush=True)
'''


def mpirun(n: int, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([MPIRUN, "-n", str(n), sys.executable, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
@pytest.mark.parametrize("n", [2, 3])
def test_transport_under_mpirun(n, tmp_path):
    pytest.importorskip("nixl")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = mpirun(n, [str(script)])
    assert out.returncode == 0, out.stdout + out.stderr
    # ranks share one stdout pipe: lines may run together ("OK 0OK 1")
    assert sorted(re.findall(r"OK \d+", out.stdout)) == [f"OK {r}" for r in range(n)]


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_main_layout_error_exits_2_on_every_rank_quickly():
    t0 = time.monotonic()
    out = mpirun(3, ["-m", "mmhpc", "deployment=e_p_d"], timeout=60)
    assert out.returncode != 0 and time.monotonic() - t0 < 30
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("mmhpc: error:")]
    assert lines == ["mmhpc: error: deployment e_p_d (1 frontend + 1 encode + 1 prefill×tp1 + "
                     "auto decode×tp1): deployment.decode.instances=auto: 3 ranks leave 0 for "
                     "decode instances of tp=1: run with -n 4 or set "
                     "deployment.frontend_shares_rank=true"]
    assert "Traceback" not in out.stderr

"""Several nodes for real, on one machine (issue 24): each node a network namespace with its own
address (tests/netns_cluster.py), MPICH's hydra spreading the ranks over them through an ssh
stand-in, mmhpc picking each node's address by `cluster.interface` (a CIDR here). Between the
nodes there is only their 10.213.N.0/24 network: 127.0.0.1 on one node is not the other's, and
each node's ranks have their own PID and IPC namespaces (no shared-memory path for UCX), so
ZeroMQ, NIXL/UCX and gloo traffic across nodes goes over those addresses or fails.

- the README's two-host line: E/P/D on 2 nodes x 2 ranks (frontend, encode | prefill, decode:
  the image embeddings cross nodes by NIXL), `cluster.interface=eth0`: greedy text over HTTP
  equals the offline engine's (itself HF-oracle tested); SIGTERM to mpiexec drains every node,
  exit 0, nothing left in either namespace.
- one aggregated TP=2 instance spanning the two nodes (gloo over the node addresses): the same.
- a node's death (every process in its namespace SIGKILLed) ends the job non-zero with ONE line
  naming a rank of that node and the node.
- serve.sbatch on a Slurm of two slurmd nodes, one per namespace (tests/slurm_cluster.py with
  `netns`): E/P/D answers, `scancel` drains both nodes (srun exits 0, no rank left).
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns_cluster import NetnsCluster, NetnsUnavailable

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def cluster():
    try:
        c = NetnsCluster(num_nodes=2).start()
    except (NetnsUnavailable, RuntimeError) as e:
        pytest.skip(f"no network namespaces here: {e}")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def image():
    from conftest import make_image
    return make_image(7, 40, 30)


class Job:
    """`mpiexec` on node 0 of the cluster; its log, its ready URL (node 0's address)."""

    def __init__(self, cluster: NetnsCluster, tmp: Path, args: list[str], overrides: list[str],
                 command: list[str] | None = None):
        """`mpiexec ARGS python -m mmhpc (tiny model, any port) OVERRIDES`, or `command` (what
        follows `mpiexec`) as it is."""
        self.cluster, self.log_path = cluster, tmp / "job.log"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("MMHPC_URL_FILE", None)
        self._log = open(self.log_path, "w")
        command = command or [*args, sys.executable, "-m", "mmhpc", "model=tiny_llava",
                              "server.port=0", f"cluster.interface={cluster.cidr}", *overrides]
        self.proc = cluster.mpiexec(
            command,
            str(BIN / "mpiexec"), env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.url = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 300) -> str:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for line in self.log().splitlines():
                if line.startswith("mmhpc ready: "):
                    port = line.split()[2].rsplit(":", 1)[1]
                    self.url = f"http://{self.cluster.addr(0)}:{port}"
                    return line
            if self.proc.poll() is not None:
                pytest.fail(f"job exited {self.proc.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        pytest.fail(f"not ready after {timeout_s} s:\n{self.log()[-4000:]}")

    def ask(self, image) -> str:
        return ask(self.cluster, self.url, image)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


def ask(cluster: NetnsCluster, url: str, image) -> str:
    """A greedy chat completion with an image, sent from node 0 (the only place the cluster's
    network is reachable from)."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    data = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = json.dumps({"max_tokens": 8, "temperature": 0, "messages": [{"role": "user",
                       "content": [{"type": "text", "text": QUESTION},
                                   {"type": "image_url", "image_url": {"url": data}}]}]})
    code = ("import sys, urllib.request; r = urllib.request.urlopen(urllib.request.Request("
            "sys.argv[1], data=sys.argv[2].encode(), headers={'Content-Type': "
            "'application/json'}), timeout=120); print(r.read().decode())")
    r = cluster.run(0, [sys.executable, "-c", code, url + "/v1/chat/completions", body],
                    timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["choices"][0]["message"]["content"]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def expected(image, model: str | None = None) -> str:
    from mmhpc import LLM, SamplingParams
    from mmhpc.tools.tiny import tiny_checkpoint
    parts = [{"type": "text", "text": QUESTION}, {"type": "image", "image": image}]
    return LLM(model or str(tiny_checkpoint("llava")), dtype="float32").generate(
        [{"role": "user", "content": parts}], SamplingParams(max_tokens=8))[0].text


def readme_line(start: str) -> list[str]:
    """The README's command that starts with `start`, as argv (`python` is this interpreter)."""
    import shlex
    line = next(ln for ln in (ROOT / "README.md").read_text().splitlines()
                if ln.startswith(start))
    return [sys.executable if w == "python" else w for w in shlex.split(line.split(" #")[0])]


def node_lines(job: Job, cluster: NetnsCluster) -> list[str]:
    return [ln for ln in job.log().splitlines() if ln.startswith("mmhpc: node ")]


def _drains(job: Job, cluster: NetnsCluster) -> None:
    job.proc.send_signal(signal.SIGTERM)
    rc = job.proc.wait(60)
    assert rc == 0, job.log()[-3000:]
    for i in range(cluster.num_nodes):        # nothing of the job left on any node
        deadline = time.monotonic() + 10
        while cluster.pids(i) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not cluster.pids(i), (i, cluster.pids(i))


def test_readme_epd_on_two_nodes_answers_and_sigterm_drains(cluster, tmp_path, image):
    # README "Several nodes", as written: default model, port 8000, cluster.interface=eth0
    argv = readme_line("mpiexec -hosts node0,node1 ")
    job = Job(cluster, tmp_path, [], [], command=argv[1:])
    try:
        ready = job.wait_ready()
        assert ready.endswith("(e_p_d: 1 frontend + 1 encode + 1 prefill×tp1 + 1 decode×tp1, "
                              "4 ranks on 2 nodes)"), ready
        assert job.url.endswith(":8000")
        assert node_lines(job, cluster) == [
            f"mmhpc: node {i} node{i}: ranks {2 * i}-{2 * i + 1} at {cluster.addr(i)} "
            f"(eth0, cluster.interface=eth0)" for i in range(2)], job.log()[-3000:]
        from mmhpc.config import DEFAULT_MODEL
        assert job.ask(image) == expected(image, str(ROOT / DEFAULT_MODEL))
        _drains(job, cluster)
    finally:
        job.stop()


@pytest.mark.slow
def test_tp_instance_spanning_two_nodes(cluster, tmp_path, image):
    job = Job(cluster, tmp_path, ["-n", "2", "-ppn", "1"],
              ["deployment=agg", "deployment.aggregated.tp=2",
               "deployment.allow_cross_node_instances=true"])
    try:
        assert job.wait_ready().endswith("(agg: 1 aggregated×tp2, 2 ranks on 2 nodes)")
        assert job.ask(image) == expected(image)
        _drains(job, cluster)
    finally:
        job.stop()


@pytest.mark.slow
def test_a_nodes_death_ends_the_job_naming_it(cluster, tmp_path):
    job = Job(cluster, tmp_path, ["-n", "4", "-ppn", "2", "-disable-auto-cleanup",
                                  str(ROOT / "bin" / "mmhpc-rank")], ["deployment=e_p_d"])
    try:
        job.wait_ready()
        cluster.kill_node(1)                  # prefill and decode's node: power gone
        rc = job.proc.wait(60)
        assert rc != 0
        dead = [ln for ln in job.log().splitlines() if "is dead" in ln]
        assert len(dead) == 1, job.log()[-3000:]
        assert "rank 2 (prefill on node1)" in dead[0] or "rank 3 (decode on node1)" in dead[0]
    finally:
        job.stop()


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_of_two_nodes_answers_and_scancel_drains(cluster, tmp_path, image):
    """serve.sbatch on a Slurm of two slurmd nodes, one per namespace: srun --mpi=pmi2 spreads
    E/P/D over them; `scancel` drains both (every rank exits 0 before KillWait)."""
    from slurm_cluster import SlurmCluster, SlurmUnavailable
    import tempfile
    # a short root: slurmd's step sockets live under it (unix socket paths: 108 bytes at most)
    slurm = SlurmCluster(Path(tempfile.mkdtemp(prefix="mmhpc-slurm-")), netns=cluster)
    try:
        slurm.start()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    env = dict(os.environ, **slurm.env(), MMHPC_SRUN_MPI="pmi2", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))

    def client(*words: str) -> str:
        r = subprocess.run(slurm.client(list(words)), env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, (words, r.stderr)
        return r.stdout

    def state(job: str) -> str:
        out = client("scontrol", "show", "job", "-o", job)
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "")

    try:
        job = client("sbatch", "--parsable", f"--output={tmp_path}/mmhpc-%j.log",
                     f"--chdir={ROOT}", "--nodes=2", "--ntasks-per-node=2",
                     "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                     str(ROOT / "slurm" / "serve.sbatch"), "deployment=e_p_d",
                     "model=tiny_llava", "cluster.nodes=2", "cluster.interface=eth0",
                     "server.port=8000").strip().split(";")[0]
        log, url_file = tmp_path / f"mmhpc-{job}.log", tmp_path / f"mmhpc-{job}.url"
        deadline = time.monotonic() + 400
        while not url_file.exists() and time.monotonic() < deadline and \
                state(job) in ("PENDING", "CONFIGURING", "RUNNING"):
            time.sleep(1)
        text = log.read_text() if log.exists() else "no log: " + client(
            "squeue", "-o", "%i %T %r %N") + slurm.log("slurmctld")[-1500:]
        assert url_file.exists(), text[-4000:]
        assert url_file.read_text().strip() == "http://node0:8000"
        assert "mmhpc: node 1 node1: ranks 2-3 at " + cluster.addr(1) in text, text[-3000:]
        assert ask(cluster, f"http://{cluster.addr(0)}:8000", image) == expected(image)
        client("scancel", job)
        deadline = time.monotonic() + 60
        while state(job) not in ("CANCELLED", "COMPLETED", "FAILED", "") and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        assert state(job) == "CANCELLED"
        deadline = time.monotonic() + 30
        while "mmhpc: srun exited" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "mmhpc: srun exited with 0" in log.read_text(), log.read_text()[-3000:]
        for i in range(2):            # no rank left on either node (the daemons stay)
            deadline = time.monotonic() + 20
            while (left := [p for p in cluster.pids(i) if b"-m\0mmhpc" in _cmdline(p)]) and \
                    time.monotonic() < deadline:
                time.sleep(0.5)
            assert not left, (i, [_cmdline(p) for p in left])
    finally:
        slurm.stop()
        __import__("shutil").rmtree(slurm.root, ignore_errors=True)

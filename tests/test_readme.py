"""Every command block of README.md is run here (issue 24), so the page cannot drift from the
code. `RUNNERS` maps each block (by its first command) to the test that runs it; a block added
or changed without a runner fails `test_every_command_block_has_a_runner`.

Default tier: every line of the Layouts, bin/mmhpc-rank and real-checkpoint blocks under its own
launcher, as written plus `--dry-run` where it would serve (real ranks, the launcher's world,
no model); the dry-runs and `--cfg job` as written; `make`'s commands; the flags of the training,
evaluation and benchmark commands; the repository layout's paths.
Slow tier: the quick start as written (`make serve` on port 8000 in a network namespace of its
own, the toydata + curl block compared with the README's shown output, the other three
questions, the openai snippet, eval_toy), every Layouts line serving for real, one training
step. The two-host line runs in tests/test_multinode.py; the Slurm lines in tests/test_slurm.py
(test_readme_slurm_lines).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent


def blocks() -> list[tuple[str, str, str]]:
    """(language, text, heading) of every fenced block."""
    text, out = README.read_text(), []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        heading = re.findall(r"^## (.+)$", text[:m.start()], re.M)[-1]
        out.append((m.group(1), m.group(2), heading))
    return out


def commands(text: str) -> list[str]:
    """The block's commands: comments dropped, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [ln.split("  #")[0].strip() for ln in joined.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def block(heading: str, start: str = "") -> str:
    return next(t for lang, t, h in blocks() if h == heading and lang and
                commands(t)[0].startswith(start))


def argv(line: str) -> list[str]:
    """A README line as argv: `python` and `.venv/bin/python` are this interpreter, `mpirun`
    and `mpiexec` the venv's."""
    words = shlex.split(line)
    subst = {"python": sys.executable, ".venv/bin/python": sys.executable,
             "mpirun": str(BIN / "mpirun"), "mpiexec": str(BIN / "mpiexec")}
    return [subst.get(w, w) for w in words]


def run(words: list[str], timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env, **kw)


# first command of each block -> where it runs
RUNNERS = {
    "make serve": "test_make_targets, test_quick_start_as_written (slow)",
    ".venv/bin/python -m mmhpc.tools.toydata": "test_quick_start_as_written (slow)",
    "from openai import OpenAI": "test_quick_start_as_written (slow)",
    "python -m mmhpc.tools.train_toy": "test_train_and_eval_flags, test_one_training_step (slow)",
    "python bench/eval_toy.py": "test_train_and_eval_flags, test_quick_start_as_written (slow)",
    "python -m mmhpc ": "test_layout_lines_under_their_launcher, test_layouts_serve (slow)",
    "mpiexec -disable-auto-cleanup": "test_layout_lines_under_their_launcher",
    "mpiexec -hosts node0,node1": "test_multinode.py::test_readme_epd_on_two_nodes_...",
    "sbatch --nodes=4 slurm/serve.sbatch": "test_slurm.py::test_readme_slurm_lines",
    "sbatch --nodes=2 --ntasks-per-node=9 slurm/serve.sbatch": "test_readme_maverick_lines",
    "mpirun -n 4 python -m mmhpc deployment=e_p_d model.path=": "test_layout_lines_...",
    ".venv/bin/python -m mmhpc.bench offline": "test_bench_flags",
}


def test_every_command_block_has_a_runner():
    for lang, text, heading in blocks():
        if not lang:                         # output shown, checked by the runs that make it
            continue
        first = commands(text)[0]
        assert any(first.startswith(k.rstrip()) for k in RUNNERS), \
            f"README block under '{heading}' starting {first!r} is run by no test"


def _dry(line: str) -> list[str]:
    words = argv(line)
    return words if "--dry-run" in words or "--cfg" in words else [*words, "--dry-run"]


LAUNCHED = [ln for h, s in [("Layouts", "python -m mmhpc"), ("Layouts", "mpiexec"),
                            ("A real checkpoint", "")]
            for ln in commands(block(h, s))]


@pytest.mark.parametrize("line", LAUNCHED)
def test_layout_lines_under_their_launcher(line):
    r = run(_dry(line))
    assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr[-2000:]}"
    if "--cfg" in line:
        assert "name: e_p_d" in r.stdout
        return
    head = r.stdout.splitlines()[0]
    m = re.match(r"(mpirun|mpiexec).* -n (\d+) ", line)
    if m:                                 # the launcher's world, every node's address
        assert f"world_size={m.group(2)} " in head, r.stdout
        assert re.search(r"^mmhpc: node 0 \S+: ranks 0-\d+ at ", r.stdout, re.M), r.stdout
    assert re.search(r"^frontend: rank 0, ", r.stdout, re.M), r.stdout


def test_readme_h200_example_fills_the_nodes():
    line = next(ln for ln in LAUNCHED if "cluster=h200 cluster.nodes=4" in ln)
    out = run(_dry(line)).stdout
    assert out.startswith("deployment=e_p_d world_size=32 nodes=4 ranks_per_node=8")
    assert "frontend+encode" in out and out.count(" decode ") == 27
    assert "(shares its GPU 0; no device of its own)" in out


def test_readme_maverick_lines():
    """The Llama-4 Maverick block: the sbatch line's overrides are the dry-run line's, on its
    nodes x ntasks-per-node ranks, and that dry-run prints the golden layout (test_layout)."""
    sbatch, dry = (shlex.split(c) for c in commands(block("Several nodes", "sbatch")))
    overrides = sbatch[sbatch.index("slurm/serve.sbatch") + 1:]
    assert dry[:3] == ["python", "-m", "mmhpc"] and dry[3:dry.index("--dry-run")] == overrides
    opt = dict(w[2:].split("=", 1) for w in sbatch if w.startswith("--"))
    assert dry[dry.index("--world-size") + 1] == str(int(opt["nodes"]) * int(opt["ntasks-per-node"]))
    r = run(argv(" ".join(dry)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (ROOT / "tests/golden/maverick_e_p_d_h200_2nodes.txt").read_text() in r.stdout


def test_make_targets():
    stamp = ".venv/.installed"          # never remade here (the shared venv)
    serve = run(["make", "-n", "-o", stamp, "serve"]).stdout
    assert "mpirun -n 4 .venv/bin/python -m mmhpc deployment=e_p_d" in serve, serve
    test = run(["make", "-n", "-o", stamp, "test"]).stdout
    assert ".venv/bin/python -m pytest -q" in test, test


def _flags(line: str) -> list[str]:
    return [w.split("=")[0] for w in shlex.split(line) if w.startswith("--")]


def test_train_and_eval_flags():
    for start, helper in [("python -m mmhpc.tools.train_toy", [sys.executable, "-m",
                                                               "mmhpc.tools.train_toy"]),
                          ("python bench/eval_toy.py", [sys.executable, "bench/eval_toy.py"])]:
        line = next(c for lang, t, _ in blocks() if lang for c in commands(t)
                    if c.startswith(start))
        usage = run([*helper, "--help"]).stdout
        for flag in _flags(line):
            assert flag in usage, (start, flag)


def test_bench_flags():
    for line in commands(block("Benchmarks")):
        words = shlex.split(line.replace("[", "").replace("]", ""))
        sub = words[words.index("mmhpc.bench") + 1]
        usage = run([sys.executable, "-m", "mmhpc.bench", sub, "--help"]).stdout
        for flag in _flags(line.replace("[", "").replace("]", "")):
            assert flag in usage, (sub, flag)


def test_repository_layout_paths():
    text = next(t for lang, t, h in blocks() if h == "Layout of the repository")
    for ln in text.splitlines():
        for path in re.findall(r"(?:^|;\s+)((?:mmhpc|bin)/[\w/-]+)", ln):
            assert (ROOT / path).exists(), path
    for name in text.splitlines()[-1].split():
        assert (ROOT / name.rstrip("/")).exists(), name


# ---- slow: serving as written -----------------------------------------------------------
@pytest.fixture
def namespace():
    from netns_cluster import NetnsCluster, NetnsUnavailable
    try:
        c = NetnsCluster(num_nodes=1).start()      # a port space of its own: 8000 is free
    except (NetnsUnavailable, RuntimeError) as e:
        pytest.skip(f"no network namespace here: {e}")
    yield c
    c.stop()


def _start(ns, words: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return subprocess.Popen(ns.command(0, words), cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _ready(proc, log: Path, timeout_s: float = 300) -> str:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("mmhpc ready: "):
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    pytest.fail(f"not ready:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(ns, proc, log: Path, within_s: float = 30, ok=(0,)) -> None:
    """SIGTERM to the command itself (make, mpirun): it ends with a status in `ok` and every
    rank is gone within `within_s`."""
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(within_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"not stopped {within_s} s after SIGTERM:\n{log.read_text()[-3000:]}")
    assert rc in ok, log.read_text()[-3000:]
    deadline = time.monotonic() + within_s
    while ns.pids(0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ns.pids(0), "ranks left after SIGTERM"


def _in_ns(ns, script: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(ns.command(0, ["bash", "-c", script]), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_quick_start_as_written(namespace, tmp_path):
    serve = _start(namespace, ["make", "-o", ".venv/.installed", "serve"], tmp_path / "serve.log")
    try:
        assert _ready(serve, tmp_path / "serve.log").startswith("mmhpc ready: http://0.0.0.0:8000")
        curl = block("The two commands", ".venv/bin/python -m mmhpc.tools.toydata")
        curl = curl.replace("/tmp/shapes.png", str(tmp_path / "shapes.png"))
        r = _in_ns(namespace, curl)
        assert r.returncode == 0, r.stderr
        shown = [t for lang, t, h in blocks() if h == "The two commands" and not lang]
        wrote, answer = shown[0], json.loads(shown[1])
        assert r.stdout.startswith(wrote.replace("/tmp/shapes.png", str(tmp_path / "shapes.png"))
                                   ), r.stdout
        got = json.loads(r.stdout.splitlines()[-1])
        for key in ("object", "model", "usage"):
            assert got[key] == answer[key], key
        assert got["choices"][0]["message"] == answer["choices"][0]["message"]
        # "Ask the other three questions by changing the text": the README's answers
        others = re.findall(r'they return (`".*?"`), (`".*?"`) and\s+(`".*?"`)',
                            README.read_text())[0]
        for (question, _), want in zip(re.findall(r"'(.+?\?|Describe the image\.)'\s+-> (.+)",
                                                  wrote)[1:], others):
            r = _in_ns(namespace, curl.replace("What shape is in the image?", question))
            assert json.loads(r.stdout.splitlines()[-1])["choices"][0]["message"]["content"] \
                == json.loads(want.strip("`")), question
        snippet = block("The two commands", "from openai import OpenAI").replace(
            "messages=[...]", "messages=[{'role': 'user', 'content': [{'type': 'image_url', "
            f"'image_url': {{'url': 'file://{tmp_path}/shapes.png'}}}}, "
            "{'type': 'text', 'text': 'What shape is in the image?'}]}]")
        snippet = snippet.replace(f"file://{tmp_path}/shapes.png", "data:image/png;base64,' + "
                                  f"__import__('base64').b64encode(open('{tmp_path}/shapes.png',"
                                  " 'rb').read()).decode() + '")
        r = _in_ns(namespace, f"{sys.executable} -c {shlex.quote(snippet + chr(10) + 'print(r.choices[0].message.content)')}")
        assert r.returncode == 0 and r.stdout.strip() == answer["choices"][0]["message"][
            "content"].strip(), r.stderr[-2000:]
        ev = block("The default model", "python bench/eval_toy.py").strip()
        ev = ev.replace("--n 200", "--n 20").replace("/tmp/a.json", str(tmp_path / "a.json"))
        r = _in_ns(namespace, ev.replace("python ", f"{sys.executable} ", 1))
        assert r.returncode == 0 and (tmp_path / "a.json").exists(), r.stdout + r.stderr
        # "a SIGTERM to make stops every rank" (make itself dies of it: -15)
        _stop(namespace, serve, tmp_path / "serve.log", ok=(0, -signal.SIGTERM))
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)


SERVING = [ln for ln in commands(block("Layouts", "python -m mmhpc"))
           if "--dry-run" not in ln and "--cfg" not in ln]


@pytest.mark.slow
@pytest.mark.parametrize("line", SERVING)
def test_layouts_serve(namespace, tmp_path, line):
    proc = _start(namespace, argv(line), tmp_path / "job.log")
    try:
        ready = _ready(proc, tmp_path / "job.log")
        n = re.search(r" -n (\d+) ", line)
        assert f"{n.group(1) if n else 1} rank" in ready, ready
        code = ("import json, urllib.request as u; m = json.load(u.urlopen("
                "'http://127.0.0.1:8000/v1/models'))['data'][0]['id']; r = u.urlopen(u.Request("
                "'http://127.0.0.1:8000/v1/completions', data=json.dumps({'model': m, 'prompt': "
                "'Hi', 'max_tokens': 2}).encode(), headers={'Content-Type': 'application/json'}));"
                " print(json.load(r)['choices'][0]['text'])")
        r = _in_ns(namespace, f"{sys.executable} -c {shlex.quote(code)}")
        assert r.returncode == 0, r.stderr[-2000:]
        _stop(namespace, proc, tmp_path / "job.log")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_one_training_step(tmp_path):
    line = next(c for lang, t, _ in blocks() if lang for c in commands(t)
                if c.startswith("python -m mmhpc.tools.train_toy"))
    words = argv(line)
    words[words.index("--out") + 1] = str(tmp_path / "toy")
    words[words.index("--steps") + 1] = "2"
    words[words.index("--device") + 1] = "cpu"
    r = run([*words, "--eval-n", "4"], timeout=600)
    assert r.returncode == 0 and (tmp_path / "toy" / "config.json").exists(), r.stderr[-2000:]

"""Same-GPU NIXL READ bandwidth (issue 10): VRAM -> VRAM between two processes on ONE GPU,
against a device-to-device torch copy and a cross-process CUDA IPC copy (torch IPC handle) in
the same run, over a sweep of UCX settings and NIXL backend parameters.

    python bench/nixl_gpu.py [--quick] [--only 'NAME|NAME']     # driver: every config, a table
    python bench/nixl_gpu.py --worker R --dir D --cfg JSON   # one rank (the driver starts two)

Each config runs as a fresh pair of processes (UCX reads its environment once, when the agent's
UCP context is made), exchanging NIXL metadata through files in a temporary folder (no MPI, no
ZMQ). Rank 0 READs from rank 1's registered VRAM (the decode-pulls-KV direction) or WRITEs to it;
every transfer's bytes are checked once. Bandwidth = bytes moved / wall time of post + wait
(GB/s = 1e9 B/s; a copy's bytes are counted once, not read + write). Results: $OUT/nixl_gpu.json,
UCX logs $OUT/nixl_gpu_ucx.log (selected lines), a markdown table on stdout.
"""
from __future__ import annotations

import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

MB = 1 << 20
SIZES = [1 * MB, 4 * MB, 16 * MB, 64 * MB, 256 * MB, 1024 * MB]
GET = {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"}
PROTO = {"UCX_PROTO_INFO": "y", "UCX_LOG_LEVEL": "info"}

# name, env overrides, extra: op (READ/WRITE), backend init params, api ("nixl" | "mmhpc"), ipc
CONFIGS = [
    ("default", dict(PROTO), {"ipc": True}),
    ("get_zcopy=y", dict(GET, **PROTO), {}),
    ("get_zcopy=y tls=cuda_ipc,cuda_copy,tcp,self",
     dict(GET, UCX_TLS="cuda_ipc,cuda_copy,tcp,self"), {}),
    ("get_zcopy=y tls=cuda_ipc,cuda_copy,sm,self",
     dict(GET, UCX_TLS="cuda_ipc,cuda_copy,sm,self", UCX_LOG_LEVEL="info"), {}),
    ("tls=cuda_ipc,cuda_copy,sm,self", dict(UCX_TLS="cuda_ipc,cuda_copy,sm,self",
                                            UCX_LOG_LEVEL="info"), {}),
    ("get_zcopy=y tls=cuda_ipc,cuda_copy,posix,self",
     dict(GET, UCX_TLS="cuda_ipc,cuda_copy,posix,self"), {}),
    ("get_zcopy=y tls=^ib", dict(GET, UCX_TLS="^ib"), {}),
    ("tls=^ib", dict(UCX_TLS="^ib"), {}),
    ("get_zcopy=y tls=all", dict(GET, UCX_TLS="all"), {}),
    ("get_zcopy=y cuda_ipc_cache=n", dict(GET, UCX_CUDA_IPC_CACHE="n"), {}),
    ("rndv_scheme=get_zcopy", dict(UCX_RNDV_SCHEME="get_zcopy", UCX_RNDV_THRESH="0"), {}),
    ("rndv_scheme=put_zcopy", dict(UCX_RNDV_SCHEME="put_zcopy", UCX_RNDV_THRESH="0"), {}),
    ("default WRITE", {}, {"op": "WRITE"}),
    ("tls=cuda_copy,tcp,self (staged)", dict(UCX_TLS="cuda_copy,tcp,self"), {"max_mb": 64}),
    ("engine_config=CUDA_IPC_ENABLE_GET_ZCOPY=y",
     {}, {"params": {"engine_config": "CUDA_IPC_ENABLE_GET_ZCOPY=y"}}),
    ("mmhpc NixlAgent (defaults)", {}, {"api": "mmhpc"}),
    ("get_zcopy=y tls=cuda_ipc,cuda_copy,sm,self err=none",
     dict(GET, UCX_TLS="cuda_ipc,cuda_copy,sm,self"), {"params": {"ucx_error_handling_mode": "none"}}),
    ("get_zcopy=y err=none", dict(GET), {"params": {"ucx_error_handling_mode": "none"}}),
    ("mmhpc NixlAgent (defaults) WRITE", {}, {"api": "mmhpc", "op": "WRITE"}),
    ("mmhpc NixlAgent (defaults) again", {}, {"api": "mmhpc", "ipc": True}),
]

UCX_KEEP = ("intra-node cfg", "rma_bw", "cuda_ipc", "cuda_copy", "nvlink", "get zcopy",
            "error", "ERROR", "failed", "WARN", "| rma", "get/", "put/", "rndv", "UCX_* env")


# ---------------------------------------------------------------------------------------------
# worker
# ---------------------------------------------------------------------------------------------

def _wait_file(path: str, timeout: float = 60.0) -> bytes:
    t = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > t:
            raise TimeoutError(f"no {path} after {timeout}s")
        time.sleep(0.01)
    with open(path, "rb") as f:
        return f.read()


def _put_file(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def worker(rank: int, d: str, cfg: dict) -> None:
    import torch
    cuda = torch.cuda.is_available()
    dev, mem = ("cuda", "VRAM") if cuda else ("cpu", "DRAM")     # cpu: a dry run of the logic
    if cuda:
        torch.cuda.set_device(0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    max_bytes = min(max(SIZES), cfg.get("max_mb", 1 << 20) * MB)
    sizes = [s for s in SIZES if s <= max_bytes]
    buf = torch.full((max_bytes,), rank + 1, dtype=torch.uint8, device=dev)
    sync()
    res: dict = {"rank": rank, "env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")}}
    t0 = time.perf_counter()
    op = cfg.get("op", "READ")
    if cfg.get("api") == "mmhpc":
        sys.path.insert(0, os.getcwd())
        from mmhpc.transport.descs import NixlDescs
        from mmhpc.transport.nixl_agent import NixlAgent
        ag = NixlAgent(f"bench{rank}")
        pool = ag.register(buf)
        md = ag.metadata()
        res["env_after_agent"] = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}

        def post(size, rdesc):
            local = NixlDescs(pool.agent, mem, [[pool.regions[0][0], size, 0]])
            remote = NixlDescs(rdesc[0], mem, [[rdesc[1], size, 0]])
            return ag.read(local, remote) if op == "READ" else ag.write(local, remote)

        def wait(h):
            ag.wait(h, timeout=60)
        my_desc = (pool.agent, pool.regions[0][0])
        add_peer = ag.add_peer
    else:
        from nixl._api import nixl_agent, nixl_agent_config
        params = cfg.get("params")
        conf = nixl_agent_config(enable_prog_thread=True, backends=[] if params else ["UCX"])
        a = nixl_agent(f"bench{rank}", conf)
        if params:
            a.create_backend("UCX", params)
            res["backend_params"] = a.get_backend_params("UCX")
        reg = a.register_memory(buf)
        md = a.get_agent_metadata()
        name = f"bench{rank}"

        def post(size, rdesc):
            ragent, raddr = rdesc
            ldl = a.get_xfer_descs([(buf.data_ptr(), size, 0)], mem)
            rdl = a.get_xfer_descs([(raddr, size, 0)], mem)
            h = a.initialize_xfer(op, ldl, rdl, ragent, b"")
            if a.transfer(h) == "ERR":
                raise RuntimeError(f"{op} failed to post")
            return h

        def wait(h):
            deadline = time.monotonic() + 60
            while True:
                s = a.check_xfer_state(h)
                if s == "DONE":
                    break
                if s == "ERR":
                    raise RuntimeError(f"{op} failed")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{op} not done after 60 s")
            a.release_xfer_handle(h)
        my_desc = (name, buf.data_ptr())

        def add_peer(m):
            n = a.add_remote_agent(m)
            return n.decode() if isinstance(n, bytes) else n
    res["agent_s"] = round(time.perf_counter() - t0, 3)
    ipc = b""
    if rank == 1 and cfg.get("ipc") and cuda:
        from torch.multiprocessing.reductions import reduce_tensor
        ipc = pickle.dumps(reduce_tensor(buf))
    _put_file(os.path.join(d, f"md{rank}"), pickle.dumps((md, my_desc, ipc)))
    peer_md, peer_desc, peer_ipc = pickle.loads(_wait_file(os.path.join(d, f"md{1 - rank}")))
    add_peer(peer_md)

    if rank == 1:        # the target: keep the memory and the agent alive until rank 0 is done
        _wait_file(os.path.join(d, "done"), timeout=300)
        sync()
        # WRITE: rank 0 wrote 1s into our buffer (checked here, reported through a file)
        if op == "WRITE":
            ok = bool((buf[:max(sizes)] == 1).all())
            _put_file(os.path.join(d, "write_check"), json.dumps(ok).encode())
        return

    rows = []
    budget = float(os.environ.get("NIXL_GPU_SIZE_BUDGET_S", "0.6"))
    try:
        for size in sizes:
            # correctness once per size
            if op == "READ":
                buf[:size].zero_()
                sync()
            t = time.perf_counter()
            wait(post(size, peer_desc))
            first = time.perf_counter() - t
            ok = bool((buf[:size] == 2).all()) if op == "READ" else None
            times = []
            tb = time.perf_counter()
            while len(times) < 3 or (time.perf_counter() - tb < budget and len(times) < 50):
                t = time.perf_counter()
                wait(post(size, peer_desc))
                times.append(time.perf_counter() - t)
                if times[-1] > 2.0:          # too slow to repeat: one timed transfer is enough
                    break
            med = statistics.median(times)
            rows.append({"size_mb": size // MB, "iters": len(times), "median_us": round(med * 1e6, 1),
                         "GBps": round(size / med / 1e9, 2), "first_ms": round(first * 1e3, 3),
                         "ok": ok})
            print(f"  {size // MB:5d} MB  {size / med / 1e9:8.2f} GB/s  ({len(times)} iters, "
                  f"first {first * 1e3:.2f} ms, ok={ok})", flush=True)
            if size / med < 1e9 and size >= 64 * MB:
                break                         # < 1 GB/s: larger sizes would only burn time
    except Exception:
        res["error"] = traceback.format_exc()[-1500:]
        print(res["error"], flush=True)
    res["rows"] = rows

    # same-process device-to-device copy and cross-process CUDA IPC copy (the same-GPU ceiling)
    if cfg.get("ipc") and cuda:
        try:
            dst = torch.empty(max(sizes), dtype=torch.uint8, device="cuda")
            src = torch.empty(max(sizes), dtype=torch.uint8, device="cuda")
            fn, args = pickle.loads(peer_ipc)
            remote = fn(*args)
            res["copy"], res["ipc_copy"] = [], []
            for size in sizes:
                for key, s in (("copy", src), ("ipc_copy", remote)):
                    for _ in range(3):
                        dst[:size].copy_(s[:size])
                    torch.cuda.synchronize()
                    ts = []
                    for _ in range(max(5, min(50, (2 << 30) // size))):
                        t = time.perf_counter()
                        dst[:size].copy_(s[:size])
                        torch.cuda.synchronize()
                        ts.append(time.perf_counter() - t)
                    med = statistics.median(ts)
                    res[key].append({"size_mb": size // MB, "GBps": round(size / med / 1e9, 2),
                                     "median_us": round(med * 1e6, 1)})
            res["ipc_ok"] = bool((remote[:max(sizes)] == 2).all())
            del remote
        except Exception:
            res["ipc_error"] = traceback.format_exc()[-1500:]
            print(res["ipc_error"], flush=True)
    _put_file(os.path.join(d, "done"), b"1")
    if op == "WRITE":
        try:
            res["write_ok"] = json.loads(_wait_file(os.path.join(d, "write_check"), 30))
        except Exception as e:  # noqa: BLE001
            res["write_ok"] = repr(e)
    _put_file(os.path.join(d, "result.json"), json.dumps(res).encode())


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def run_config(name: str, env_over: dict, extra: dict, timeout: float) -> dict:
    d = tempfile.mkdtemp(prefix="nixlgpu")
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")}
    env.update(env_over)
    env["PYTHONUNBUFFERED"] = "1"
    cfg = json.dumps(extra)
    logs, procs = [], []
    t0 = time.perf_counter()
    for r in (1, 0):
        log = open(os.path.join(d, f"log{r}"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(r), "--dir", d,
                                       "--cfg", cfg], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    rcs = []
    for p in procs:
        left = max(1.0, timeout - (time.perf_counter() - t0))
        try:
            rcs.append(p.wait(left))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            rcs.append("timeout")
    res: dict = {"name": name, "env": env_over, "extra": extra, "rc": rcs,
                 "wall_s": round(time.perf_counter() - t0, 1)}
    try:
        with open(os.path.join(d, "result.json")) as f:
            res.update(json.load(f))
    except FileNotFoundError:
        res["error"] = res.get("error", "no result (see log)")
    text = ""
    for r, log in zip((1, 0), logs):
        log.seek(0)
        body = log.read()
        text += f"--- rank {r} ---\n" + body
    keep = [ln for ln in text.splitlines()
            if any(k in ln for k in UCX_KEEP) or ln.startswith(("---", "  ", "Traceback"))
            or "Error" in ln]
    res["log_tail"] = "\n".join(text.splitlines()[-25:])[-3000:]
    res["log_keep"] = "\n".join(keep[:400])[-20000:]
    return res


def driver(argv: list[str]) -> None:
    out = os.environ.get("OUT", "/tmp")
    only = None
    if "--only" in argv:
        only = set(argv[argv.index("--only") + 1].split("|"))
    quick = "--quick" in argv
    timeout = float(os.environ.get("NIXL_GPU_CFG_TIMEOUT", "75"))
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "configs": []}
    try:
        import torch
        results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        results["torch"] = torch.__version__
    except Exception as e:  # noqa: BLE001
        results["device"] = repr(e)
    try:
        import nixl
        results["nixl_module"] = getattr(nixl, "__name__", "?")
    except Exception as e:  # noqa: BLE001
        results["nixl_module"] = repr(e)
    ucx_log = open(os.path.join(out, "nixl_gpu_ucx.log"), "w")
    for name, env_over, extra in CONFIGS:
        if only and name not in only:
            continue
        if quick:
            extra = dict(extra, max_mb=min(extra.get("max_mb", 1024), 64))
        print(f"\n=== {name}  env={env_over} extra={extra}", flush=True)
        try:
            r = run_config(name, env_over, extra, timeout)
        except Exception:  # noqa: BLE001
            r = {"name": name, "error": traceback.format_exc()[-1500:]}
        ucx_log.write(f"\n===== {name} env={env_over} extra={extra} rc={r.get('rc')}\n")
        ucx_log.write(r.pop("log_keep", ""))
        ucx_log.flush()
        if r.get("error"):
            print("ERROR:", r["error"][-800:], "\n", r.get("log_tail", "")[-1500:], flush=True)
        for row in r.get("rows", []):
            print(f"  {row['size_mb']:5d} MB {row['GBps']:9.2f} GB/s  ok={row['ok']}", flush=True)
        results["configs"].append(r)
        with open(os.path.join(out, "nixl_gpu.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(table(results), flush=True)


def table(results: dict) -> str:
    base = next((c for c in results["configs"] if c.get("copy")), None)
    sizes = [row["size_mb"] for row in base["copy"]] if base else [s // MB for s in SIZES]
    head = "| config | " + " | ".join(f"{s} MB" for s in sizes) + " |"
    lines = [head, "|" + " --- |" * (len(sizes) + 1)]
    if base:
        for key, label in (("copy", "torch D2D copy (same process)"),
                           ("ipc_copy", "torch copy via CUDA IPC handle (cross-process)")):
            by = {row["size_mb"]: row["GBps"] for row in base[key]}
            lines.append(f"| {label} | " + " | ".join(f"{by.get(s, '')}" for s in sizes) + " |")
    for c in results["configs"]:
        by = {row["size_mb"]: row["GBps"] for row in c.get("rows", [])}
        note = "" if c.get("rows") else " (failed: " + (c.get("error") or "?").strip() \
            .splitlines()[-1][:80] + ")"
        lines.append(f"| NIXL {c.get('extra', {}).get('op', 'READ')} {c['name']}{note} | "
                     + " | ".join(f"{by.get(s, '–')}" for s in sizes) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        a = sys.argv
        worker(int(a[a.index("--worker") + 1]), a[a.index("--dir") + 1],
               json.loads(a[a.index("--cfg") + 1]))
    else:
        driver(sys.argv[1:])

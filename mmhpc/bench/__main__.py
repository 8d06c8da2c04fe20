"""`python -m mmhpc.bench offline ...` | `python -m mmhpc.bench serve --url ... ...`"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mmhpc.bench")
    sub = p.add_subparsers(dest="cmd", required=True)
    from mmhpc.bench import offline, serve
    offline.add_args(sub.add_parser("offline", help="engine throughput (and HF) on synthetic data"))
    serve.add_args(sub.add_parser("serve", help="OpenAI-API serving client (vLLM bench serve metrics)"))
    args = p.parse_args(argv)
    (offline.run if args.cmd == "offline" else serve.run)(args)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Accuracy of a served toy model over HTTP (issue 9).

    python bench/eval_toy.py --url http://127.0.0.1:PORT --n 200 --seed 12345 [--model NAME]
        [--style classic|sketch|train|heldout|NAME,NAME]

Draws ``n`` fresh synthetic images and questions with
``mmhpc.tools.toydata.dataset(n, seed, style)`` (``--style``: the drawing style, default
classic; ``heldout`` is the style kept out of training, ``train`` the training mix), sends each as one chat completion (the image as a base64 PNG ``data:`` URL, then the question)
to any OpenAI-compatible server with greedy decoding (temperature 0), and prints the accuracy
per question type (shape, colour, count, describe) as a markdown table; ``--json`` also writes
the table and every wrong answer to a file. It also prints a digest (sha256 of the answers in
order); ``--answers FILE`` writes every answer, and

    python bench/eval_toy.py --compare agg.json epd.json

compares two such dumps (e.g. the aggregated and the E/P/D deployment): it prints
"answers identical: yes" or every differing answer, and exits 1 when they differ.
Exits 1 when a request fails.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmhpc.tools import toydata, toystyles  # noqa: E402


def messages_for(sample) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": toydata.image_to_data_url(sample.image)}},
        {"type": "text", "text": sample.question},
    ]}]


def digest(preds) -> str:
    """sha256 (first 16 hex digits) of the answers in order (a failed request counts as null)."""
    return hashlib.sha256(json.dumps(list(preds)).encode()).hexdigest()[:16]


def compare(path_a: str, path_b: str) -> int:
    """Compares two ``--answers`` dumps; 0 when every answer is the same."""
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    if (a["n"], a["seed"], a.get("style")) != (b["n"], b["seed"], b.get("style")):
        print(f"different data: n/seed/style {a['n']}/{a['seed']}/{a.get('style')} vs "
              f"{b['n']}/{b['seed']}/{b.get('style')}")
        return 1
    diff = [i for i, (x, y) in enumerate(zip(a["answers"], b["answers"])) if x != y]
    print(f"{path_a}: digest {digest(a['answers'])}, {path_b}: digest {digest(b['answers'])}")
    for i in diff[:20]:
        print(f"  #{i} [{a['qtypes'][i]}] {a['answers'][i]!r} != {b['answers'][i]!r}")
    print(f"answers identical: {'no' if diff else 'yes'} ({len(a['answers']) - len(diff)}/"
          f"{len(a['answers'])} the same)")
    return 1 if diff else 0


async def run(args) -> int:
    from openai import AsyncOpenAI

    base = args.url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    client = AsyncOpenAI(base_url=base, api_key=args.api_key, timeout=args.timeout,
                         max_retries=0)
    model = args.model
    if model is None:
        models = await client.models.list()
        model = models.data[0].id
    styles = toystyles.styles_arg(args.style)
    samples = toydata.dataset(args.n, args.seed, styles[0] if len(styles) == 1 else styles)
    sem = asyncio.Semaphore(args.concurrency)
    errors: list[str] = []

    async def ask(s):
        async with sem:
            try:
                r = await client.chat.completions.create(
                    model=model, messages=messages_for(s), temperature=0.0,
                    max_tokens=args.max_tokens)
                return r.choices[0].message.content or ""
            except Exception as e:  # noqa: BLE001 - report, count as wrong
                errors.append(f"{type(e).__name__}: {e}")
                return None

    t0 = time.time()
    preds = await asyncio.gather(*(ask(s) for s in samples))
    wall = time.time() - t0
    await client.close()
    table = toydata.score(samples, preds)
    print(f"model {model} at {base}: {args.n} requests (seed {args.seed}, style "
          f"{','.join(styles)}) in {wall:.1f} s")
    print(toydata.format_table(table))
    print(f"answers digest: {digest(preds)}")
    wrong = [{"qtype": s.qtype, "question": s.question, "answer": s.answer, "got": p}
             for s, p in zip(samples, preds) if p is None or not toydata.is_correct(p, s.answer)]
    for w in wrong[:args.show_wrong]:
        print(f"  [{w['qtype']}] want {w['answer']!r} got {w['got']!r}")
    if errors:
        print(f"{len(errors)} request(s) failed, first: {errors[0]}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"url": base, "model": model, "n": args.n, "seed": args.seed,
             "style": ",".join(styles), "wall_s": wall, "table": table, "wrong": wrong, "errors": errors}, indent=2) + "\n")
    if args.answers:
        Path(args.answers).write_text(json.dumps(
            {"url": base, "model": model, "n": args.n, "seed": args.seed,
             "style": ",".join(styles), "digest": digest(preds), "qtypes": [s.qtype for s in samples],
             "answers": list(preds)}, indent=1) + "\n")
    return 1 if errors else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--model", default=None, help="default: the first of /v1/models")
    ap.add_argument("--style", default="classic",
                    help=f"drawing style of the images: {', '.join(toydata.STYLES)}; heldout "
                         f"({toydata.HELDOUT_STYLE}, never trained), train (the training mix), "
                         f"all, or NAME,NAME (default classic)")
    ap.add_argument("--api-key", default="EMPTY")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--show-wrong", type=int, default=10)
    ap.add_argument("--json", default=None, help="write the table and wrong answers here")
    ap.add_argument("--answers", default=None, help="write every answer (in order) here")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                    help="compare two --answers files instead of evaluating")
    args = ap.parse_args(argv)
    try:
        toystyles.styles_arg(args.style)
    except ValueError as e:
        ap.error(str(e))
    if args.compare:
        return compare(*args.compare)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

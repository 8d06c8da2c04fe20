"""Synthetic shapes: images and questions with short exact answers (issue 9).

A *scene* is 1-3 non-overlapping flat objects on a plain, mid-grey-ish background. Every object
has a shape (SHAPES), a colour (COLOURS), a size and a position. Colours are saturated or
extreme (white, black) and the backgrounds are muted greys, so every object contrasts.
That is the ``classic`` drawing style; ``mmhpc.tools.toystyles`` draws the same kind of scenes
other ways (turned, squeezed, outlined, on tinted, gradient, textured or noisy backgrounds;
issue 24), one of them (``HELDOUT_STYLE``) never used in training. ``style=`` picks them.

Questions (QUESTIONS) and their answers:

* ``shape``    "What shape is in the image?"  -> "circle"     asked only when ALL objects share
  one shape (the colours may differ);
* ``colour``   "What colour is the shape?"    -> "red"        asked only when ALL objects share
  one colour (the shapes may differ);
* ``count``    "How many shapes are there?"   -> "2"          always well defined;
* ``describe`` "Describe the image."          -> "a red circle and two blue stars"
  the distinct (colour, shape) kinds in canonical order (SHAPES order, then COLOURS order),
  each as "a|an <colour> <shape>" or "two|three <colour> <shape>s", joined by ", " and " and ".

``sample(rng)`` draws a question type uniformly, then a scene for which it is well defined
(the object count uniform in 1..3), so every type and every count is equally frequent.
``dataset(n, seed)`` is the deterministic list of the first n samples of ``random.Random(seed)``;
the same seed gives the same images, questions and answers on every machine (only Python's
``random``, numpy's PCG64 seeded from it, and PIL drawing are used). The classic style draws
exactly what it drew before styles existed (same seed, same image).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from mmhpc.tools import toystyles
from mmhpc.tools.toystyles import HELDOUT_STYLE, STYLES, TRAIN_STYLES  # noqa: F401 - re-exported

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "star": "stars", "cross": "crosses"}
COLOURS = {
    "red": (215, 30, 30),
    "green": (30, 165, 50),
    "blue": (35, 70, 225),
    "yellow": (240, 225, 35),
    "orange": (250, 140, 15),
    "purple": (140, 45, 185),
    "white": (250, 250, 250),
    "black": (12, 12, 12),
}
BACKGROUNDS = ((128, 128, 128), (108, 108, 120), (150, 146, 136), (122, 112, 104), (98, 104, 98))
QUESTIONS = {
    "shape": "What shape is in the image?",
    "colour": "What colour is the shape?",
    "count": "How many shapes are there?",
    "describe": "Describe the image.",
}
QTYPES = tuple(QUESTIONS)
NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
MAX_OBJECTS = 3
_SUPER = 4          # draw at 4x then downsample: smooth, deterministic edges
_JITTER = 12        # per-channel colour jitter of an object
# object bounding-box side in pixels (at IMAGE_SIZE), by the number of objects in the scene
SIZE_RANGE = {1: (20, 32), 2: (18, 28), 3: (16, 24)}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: int           # classic: bounding-box side; other styles: circumscribed diameter
    cx: int
    cy: int
    angle: float = 0.0  # degrees (styles other than classic)
    aspect: float = 1.0  # x squeeze before turning
    line: float = 0.0   # outline width in pixels; 0: filled


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    qtype: str
    question: str
    answer: str
    objects: tuple[Obj, ...]
    style: str = "classic"


# ----------------------------------------------------------------------------- answers
def describe(objects) -> str:
    kinds: dict[tuple[str, str], int] = {}
    for o in objects:
        kinds[(o.shape, o.colour)] = kinds.get((o.shape, o.colour), 0) + 1
    cnames = list(COLOURS)
    order = sorted(kinds, key=lambda k: (SHAPES.index(k[0]), cnames.index(k[1])))
    parts = []
    for shape, colour in order:
        n = kinds[(shape, colour)]
        article = "an" if colour[0] in "aeiou" else "a"
        count = article if n == 1 else NUMBER_WORDS[n]
        parts.append(f"{count} {colour} {shape if n == 1 else PLURALS[shape]}")
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def answers(objects) -> dict[str, str]:
    """Every well-defined question type of a scene -> its exact answer."""
    out = {}
    if len({o.shape for o in objects}) == 1:
        out["shape"] = objects[0].shape
    if len({o.colour for o in objects}) == 1:
        out["colour"] = objects[0].colour
    out["count"] = str(len(objects))
    out["describe"] = describe(objects)
    return out


def normalize(text: str) -> str:
    """Lower-case, trimmed, without a final full stop: the form answers are compared in."""
    t = " ".join(text.strip().lower().split())
    return t.rstrip(".").strip()


def is_correct(pred: str, answer: str) -> bool:
    return normalize(pred) == normalize(answer)


def score(samples, preds, verbose: bool = False) -> dict[str, dict[str, float]]:
    """Per-question-type accuracy of `preds` (None: no answer) against the samples."""
    table: dict[str, dict[str, float]] = {}
    for s, p in zip(samples, preds):
        row = table.setdefault(s.qtype, {"n": 0, "correct": 0})
        row["n"] += 1
        ok = p is not None and is_correct(p, s.answer)
        row["correct"] += ok
        if verbose and not ok:
            print(f"  [{s.qtype}] want {s.answer!r} got {p!r}")
    allrow = {"n": sum(r["n"] for r in table.values()),
              "correct": sum(r["correct"] for r in table.values())}
    table = {q: table[q] for q in QTYPES if q in table}
    table["all"] = allrow
    for r in table.values():
        r["accuracy"] = r["correct"] / max(1, r["n"])
    return table


def format_table(table) -> str:
    lines = ["| question type | n | correct | accuracy |", "|---|---|---|---|"]
    for q, r in table.items():
        lines.append(f"| {q} | {r['n']} | {r['correct']} | {100 * r['accuracy']:.1f}% |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- drawing
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a) + r * 0.1))
        return pts
    raise ValueError(shape)


def _draw(draw: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    s = _SUPER
    cx, cy, r = o.cx * s, o.cy * s, o.size * s / 2
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
        q = r * 0.92
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif o.shape == "cross":
        t = r / 3
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)


def _fill(o: Obj, rng: random.Random | None) -> tuple[int, int, int]:
    base = COLOURS[o.colour]
    if rng is not None:
        base = tuple(max(0, min(255, c + rng.randint(-_JITTER, _JITTER))) for c in base)
    return base


def render(objects, background, rng: random.Random | None = None,
           size: int = IMAGE_SIZE) -> Image.Image:
    """Draws the scene in the classic style (object colours jittered by ``rng`` when given)
    as an RGB image."""
    big = Image.new("RGB", (IMAGE_SIZE * _SUPER, IMAGE_SIZE * _SUPER), tuple(background))
    draw = ImageDraw.Draw(big)
    for o in objects:
        _draw(draw, o, _fill(o, rng))
    img = big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    if size != IMAGE_SIZE:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img


# ----------------------------------------------------------------------------- sampling
def _place(rng: random.Random, sizes: list[int]) -> list[tuple[int, int]] | None:
    placed: list[tuple[int, int, int]] = []
    for s in sizes:
        for _ in range(100):
            h = s // 2 + 1
            cx, cy = rng.randint(h, IMAGE_SIZE - h), rng.randint(h, IMAGE_SIZE - h)
            if all(max(abs(cx - x), abs(cy - y)) >= (s + t) / 2 + 2 for x, y, t in placed):
                placed.append((cx, cy, s))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def make_objects(rng: random.Random, n: int, shape: str | None = None,
                 colour: str | None = None, style: str = "classic") -> tuple[Obj, ...]:
    """n non-overlapping objects; all of ``shape`` / all of ``colour`` when given."""
    st = STYLES[style]
    while True:
        lo, hi = (toystyles.TURNED_SIZE_RANGE if st.turn else SIZE_RANGE)[n]
        sizes = [rng.randint(lo, hi) for _ in range(n)]
        pos = _place(rng, sizes)
        if pos is not None:
            break
    cnames = list(COLOURS)
    return tuple(Obj(shape or rng.choice(SHAPES), colour or rng.choice(cnames), s, x, y,
                     *toystyles.look(rng, st, s))
                 for s, (x, y) in zip(sizes, pos))


def draw_scene(objects, style: str, rng: random.Random) -> Image.Image:
    """The image of ``objects`` in ``style`` (background, colour jitter and noise from rng)."""
    if style == "classic":
        return render(objects, rng.choice(BACKGROUNDS), rng)
    fills = [_fill(o, rng) for o in objects]
    return toystyles.draw(objects, fills, STYLES[style], rng, BACKGROUNDS, IMAGE_SIZE, _SUPER)


def sample(rng: random.Random, qtype: str | None = None, n: int | None = None,
           weights=None, style="classic") -> Sample:
    """One (image, question, answer); the type (by ``weights`` over QTYPES, else uniformly)
    and the count (uniformly) are drawn unless given; ``style``: a style name, or a tuple of
    names to draw one from."""
    if not isinstance(style, str):
        style = rng.choice(style)
    if qtype is None:
        qtype = rng.choices(QTYPES, weights=weights)[0] if weights else rng.choice(QTYPES)
    n = n or rng.randint(1, MAX_OBJECTS)
    shape = rng.choice(SHAPES) if qtype == "shape" else None
    colour = rng.choice(list(COLOURS)) if qtype == "colour" else None
    objects = make_objects(rng, n, shape=shape, colour=colour, style=style)
    image = draw_scene(objects, style, rng)
    return Sample(image, qtype, QUESTIONS[qtype], answers(objects)[qtype], objects, style)


def dataset(n: int, seed: int, style="classic") -> list[Sample]:
    """The first n samples drawn from ``random.Random(seed)`` (deterministic); ``style``: a
    name, or a tuple of names (each sample draws one)."""
    rng = random.Random(seed)
    return [sample(rng, style=style) for _ in range(n)]


def training_batch(seed: int, index: int, size: int, styles=TRAIN_STYLES,
                   weights=None) -> list[Sample]:
    """Batch ``index`` of the training stream of ``seed``: ``size`` samples, each in one of
    ``styles``, question types by ``weights`` (QTYPES order; uniform when None). Every batch
    has its own generator, so batches can be drawn in any order or process."""
    rng = random.Random(f"toy-train/{seed}/{index}")
    return [sample(rng, weights=weights, style=tuple(styles)) for _ in range(size)]


def image_to_data_url(image: Image.Image) -> str:
    """PNG data: URL of an image (what an OpenAI-compatible client sends)."""
    import base64
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def contact_sheet(samples, cols: int = 8) -> Image.Image:
    """A grid of the samples' images (for a look by eye)."""
    rows = (len(samples) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (IMAGE_SIZE + 2), rows * (IMAGE_SIZE + 2)), (255, 255, 255))
    for i, s in enumerate(samples):
        sheet.paste(s.image, ((i % cols) * (IMAGE_SIZE + 2), (i // cols) * (IMAGE_SIZE + 2)))
    return sheet


def sample_scene(seed: int = 0, n: int = 1,
                 style: str = "classic") -> tuple[Image.Image, dict[str, str]]:
    """One scene of ``n`` objects from ``random.Random(seed)``: its image and every well-defined
    question -> its exact answer (with one object every question type is defined)."""
    rng = random.Random(seed)
    objects = make_objects(rng, n, style=style)
    image = draw_scene(objects, style, rng)
    return image, {QUESTIONS[q]: a for q, a in answers(objects).items()}


def main(argv=None) -> int:
    """python -m mmhpc.tools.toydata --sample /tmp/shapes.png [--seed 0] [--objects 1]
    python -m mmhpc.tools.toydata [n] [seed] [sheet.png]     (n samples; a contact sheet)
    either with [--style classic|NAME|train|heldout|all|NAME,NAME]"""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m mmhpc.tools.toydata",
                                 description="Synthetic shapes images and questions (issue 9).")
    ap.add_argument("n", nargs="?", type=int, default=16, help="samples to list (default 16)")
    ap.add_argument("seed", nargs="?", type=int, default=None, help="default 0")
    ap.add_argument("sheet", nargs="?", default=None, help="write their contact sheet here")
    ap.add_argument("--sample", metavar="PNG", default=None,
                    help="write one test image here and print its questions and answers")
    ap.add_argument("--seed", dest="seed_opt", type=int, default=None)
    ap.add_argument("--objects", type=int, default=1, choices=range(1, MAX_OBJECTS + 1),
                    help="objects in the --sample image (default 1)")
    ap.add_argument("--style", default="classic",
                    help=f"drawing style: one of {', '.join(STYLES)} (held out of training: "
                         f"{HELDOUT_STYLE}), or train|heldout|all|NAME,NAME to draw each "
                         f"sample's from (default classic)")
    args = ap.parse_args(argv)
    seed = args.seed_opt if args.seed_opt is not None else (args.seed or 0)
    try:
        styles = toystyles.styles_arg(args.style)
    except ValueError as e:
        ap.error(str(e))
    if args.sample:
        image, qa = sample_scene(seed, args.objects, random.Random(seed).choice(styles)
                                 if len(styles) > 1 else styles[0])
        image.save(args.sample)
        print(f"wrote {args.sample} ({IMAGE_SIZE}x{IMAGE_SIZE} PNG, seed {seed}); "
              f"questions and the answers expected:")
        for q, a in qa.items():
            print(f"  {q!r:32s} -> {a}")
        return 0
    data = dataset(args.n, seed, styles[0] if len(styles) == 1 else styles)
    for s in data:
        print(f"{s.style:9s} {s.qtype:9s} {s.question!r:34s} -> {s.answer}")
    if args.sheet:
        contact_sheet(data).save(args.sheet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Drawing styles of the synthetic shapes (issue 24 item 7): the same scenes drawn other ways.

A *style* says how a scene's objects and background are drawn; the objects themselves (shape,
colour, size, position) and so the questions and answers do not depend on it. ``classic`` is
the original drawing of issue 9 (upright, filled, on a flat grey; drawn by ``toydata.render``,
bit for bit as before). Every other style turns each object to any angle, squeezes it to an
aspect of 0.6-1 (circles become ellipses, squares oblongs) and fits it in the circle of its
size, then draws it filled or as an outline 1.5-3 px wide on one of these backgrounds:

* ``grey``     one of ``toydata.BACKGROUNDS`` (the classic greys);
* ``tint``     one flat muted colour (any hue, saturation <= 0.3, value 0.38-0.66);
* ``gradient`` a linear blend of two muted colours at any angle;
* ``texture``  two muted tones in stripes (any angle), a checkerboard or a grid of dots
               (the style's ``textures``);

and ``noise`` adds Gaussian pixel noise (per channel) to the whole image. Muted backgrounds
keep every object colour (saturated, white or black) apart from the background.

STYLES lists them; ``HELDOUT_STYLE`` (``sketch``: outlines on gradients, checks and dots,
light noise) is never drawn in training (``TRAIN_STYLES``): it is the held-out test. Its
ingredients are trained, apart: outlines on flat, noisy and striped backgrounds; gradients,
checks and dots only under filled shapes.

Randomness comes from the caller's ``random.Random`` (and a numpy generator seeded from it), so
a seed gives the same image on every machine.
"""
from __future__ import annotations

import colorsys
import functools
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Style:
    name: str
    fill: float                       # probability that an object is filled (else outlined)
    backgrounds: tuple[str, ...]      # background kinds, one drawn per image
    noise: float = 0.0                # max sigma of the pixel noise (0: none), in 0-255 units
    turn: bool = True                 # any angle and aspect (False: the classic drawing)
    doc: str = ""
    textures: tuple[str, ...] = ("stripes", "checks", "dots")   # kinds of "texture"


STYLES = {s.name: s for s in (
    Style("classic", 1.0, ("grey",), turn=False,
          doc="issue 9's drawing: upright, filled, flat grey"),
    Style("solid", 1.0, ("grey", "tint"), doc="turned, squeezed, filled, on flat colours"),
    Style("outline", 0.0, ("grey", "tint"), doc="turned, squeezed outlines on flat colours"),
    Style("gradient", 1.0, ("gradient",), doc="filled, on two-colour gradients"),
    Style("textured", 1.0, ("texture",), doc="filled, on stripes, checks or dots"),
    Style("noisy", 0.5, ("grey", "tint"), noise=16.0,
          doc="filled or outlined, with pixel noise"),
    Style("hatched", 0.0, ("texture",), textures=("stripes",),
          doc="outlines on stripes"),
    Style("sketch", 0.0, ("gradient", "texture"), noise=6.0, textures=("checks", "dots"),
          doc="outlines on gradients, checks and dots (held out of training)"),
)}
HELDOUT_STYLE = "sketch"
TRAIN_STYLES = tuple(s for s in STYLES if s != HELDOUT_STYLE)

# circumscribed diameter in pixels (at 64 px) by the number of objects, turned styles
TURNED_SIZE_RANGE = {1: (22, 40), 2: (18, 32), 3: (16, 26)}
ASPECT = (0.6, 1.0)
LINE = (1.5, 3.0)                     # outline width in pixels (at 64 px), <= size / 8


def styles_arg(value) -> tuple[str, ...]:
    """A style name, "train" (TRAIN_STYLES), "heldout", "all" or a comma list -> names."""
    if isinstance(value, (tuple, list)):
        names = tuple(value)
    elif value == "train":
        names = TRAIN_STYLES
    elif value == "heldout":
        names = (HELDOUT_STYLE,)
    elif value == "all":
        names = tuple(STYLES)
    else:
        names = tuple(v.strip() for v in str(value).split(",") if v.strip())
    bad = [n for n in names if n not in STYLES]
    if bad or not names:
        raise ValueError(f"unknown style {bad or value!r}: one of {', '.join(STYLES)}, "
                         f"train, heldout, all")
    return names


# ----------------------------------------------------------------------------- objects
def look(rng: random.Random, style: Style, size: int) -> tuple[float, float, float]:
    """(angle in degrees, aspect, line width; 0 = filled) of one object of ``style``."""
    if not style.turn:
        return 0.0, 1.0, 0.0
    angle = rng.uniform(0.0, 360.0)
    aspect = rng.uniform(*ASPECT)
    line = 0.0 if rng.random() < style.fill else rng.uniform(LINE[0], min(LINE[1], size / 8))
    return angle, aspect, line


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """The shape upright, centred, inside the unit circle (touching it)."""
    if shape == "circle":
        return [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 48,
                                                                endpoint=False)]
    if shape == "square":
        q = 1 / math.sqrt(2)
        return [(-q, -q), (q, -q), (q, q), (-q, q)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [((1 if i % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 (1 if i % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5))
                for i in range(10)]
    if shape == "cross":
        a = 1 / math.sqrt(1 + 1 / 9)
        t = a / 3
        return [(-t, -a), (t, -a), (t, -t), (a, -t), (a, t), (t, t), (t, a), (-t, a), (-t, t),
                (-a, t), (-a, -t), (-t, -t)]
    raise ValueError(shape)


def outline(obj, scale: float) -> list[tuple[float, float]]:
    """The object's polygon in pixels of an image ``scale`` times larger: squeezed along x by
    its aspect, turned by its angle, inside its circle (less half the line of an outline)."""
    r = (obj.size / 2 - obj.line / 2) * scale
    cx, cy = obj.cx * scale, obj.cy * scale
    c, s = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
    pts = []
    for x, y in _unit_outline(obj.shape):
        x *= obj.aspect
        pts.append((cx + r * (c * x - s * y), cy + r * (s * x + c * y)))
    return pts


# ----------------------------------------------------------------------------- backgrounds
def muted(rng: random.Random) -> np.ndarray:
    """A muted colour (any hue, low saturation, mid value) as float RGB 0-255."""
    h, s, v = rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.38, 0.66)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


@functools.lru_cache(maxsize=4)
def _grid(side: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel-centre coordinates of a [side, side] image, in units of ``scale`` pixels."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    return (yy + 0.5) / scale, (xx + 0.5) / scale


def _texture(rng: random.Random, kinds: tuple[str, ...], side: int,
             scale: float) -> np.ndarray:
    """[side, side] bool: stripes, checks or dots (one of ``kinds``; periods in image pixels,
    the image drawn ``scale`` times larger)."""
    yy, xx = _grid(side, scale)
    kind = rng.choice(kinds)
    a = rng.uniform(0.0, math.pi)
    u, v = xx * math.cos(a) + yy * math.sin(a), -xx * math.sin(a) + yy * math.cos(a)
    if kind == "stripes":
        p = rng.uniform(4.0, 10.0)
        return (u % p) < p / 2
    if kind == "checks":
        p = rng.uniform(3.0, 8.0)
        return (np.floor(u / p) + np.floor(v / p)) % 2 == 1
    p = rng.uniform(5.0, 9.0)
    rad = rng.uniform(1.0, 0.3 * p)
    du, dv = (u % p) - p / 2, (v % p) - p / 2
    return du * du + dv * dv < rad * rad


def _rgb(c: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.rint(c), 0, 255))


def background(rng: random.Random, style: Style, side: int, scale: int,
               greys) -> Image.Image:
    """A ``side`` x ``side`` RGB background of one of the style's kinds (``scale``: the
    supersampling; gradients are computed at 1/scale and blown up, they are smooth)."""
    kind = rng.choice(style.backgrounds)
    if kind == "grey":
        return Image.new("RGB", (side, side), tuple(rng.choice(greys)))
    c1 = muted(rng)
    if kind == "tint":
        return Image.new("RGB", (side, side), _rgb(c1))
    if kind == "gradient":
        c2 = muted(rng)
        a = rng.uniform(0.0, 2 * math.pi)
        small = side // scale
        yy, xx = _grid(small, small)                                        # 0..1
        t = np.clip(0.5 + ((xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a)), 0.0, 1.0)
        arr = c1 * (1 - t[..., None]) + c2 * t[..., None]                   # [small, small, 3]
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
        return img.resize((side, side), Image.Resampling.BILINEAR)
    if kind == "texture":
        delta = rng.uniform(18.0, 40.0) * rng.choice((-1, 1))
        c2 = np.clip(c1 + delta, 60.0, 190.0)
        mask = Image.fromarray(_texture(rng, style.textures, side, scale).astype(np.uint8) * 255, "L")
        return Image.composite(Image.new("RGB", (side, side), _rgb(c2)),
                               Image.new("RGB", (side, side), _rgb(c1)), mask)
    raise ValueError(kind)


# ----------------------------------------------------------------------------- drawing
def draw(objects, fills, style: Style, rng: random.Random, greys, image_size: int,
         supersample: int) -> Image.Image:
    """The scene in ``style``: background, each object in its ``fills`` colour (filled or
    outlined), drawn ``supersample`` times larger and box-downsampled, then the noise."""
    side = image_size * supersample
    img = background(rng, style, side, supersample, greys)
    pen = ImageDraw.Draw(img)
    scale = supersample
    for o, rgb in zip(objects, fills):
        pts = outline(o, scale)
        if o.line > 0:
            pen.line(pts + pts[:1], fill=tuple(rgb), width=max(1, round(o.line * scale)),
                     joint="curve")
            w = o.line * scale / 2               # round the closing corner like the others
            x, y = pts[0]
            pen.ellipse([x - w, y - w, x + w, y + w], fill=tuple(rgb))
        else:
            pen.polygon(pts, fill=tuple(rgb))
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    if style.noise > 0:
        sigma = rng.uniform(0.3, 1.0) * style.noise
        noise = np.random.default_rng(rng.getrandbits(64)).normal(
            0.0, sigma, (image_size, image_size, 3))                        # [H, W, 3]
        arr = np.asarray(img, dtype=np.float64) + noise
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img

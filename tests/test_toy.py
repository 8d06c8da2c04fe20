"""The synthetic shapes data (mmhpc.tools.toydata) and the shipped toy model (issue 9)."""
from __future__ import annotations

import base64
import io
import random
from pathlib import Path

import pytest
from PIL import Image

from mmhpc.tools import toydata

TOY = Path(__file__).resolve().parents[1] / "models" / "mmhpc-toy"


def test_dataset_is_deterministic():
    a, b = toydata.dataset(24, 7), toydata.dataset(24, 7)
    for x, y in zip(a, b):
        assert (x.qtype, x.question, x.answer, x.objects) == (y.qtype, y.question, y.answer,
                                                              y.objects)
        assert x.image.tobytes() == y.image.tobytes()
    c = toydata.dataset(24, 8)
    assert [s.image.tobytes() for s in a] != [s.image.tobytes() for s in c]


def test_covers_all_shapes_colours_counts_and_types():
    data = toydata.dataset(400, 0)
    objs = [o for s in data for o in s.objects]
    assert {o.shape for o in objs} == set(toydata.SHAPES)
    assert {o.colour for o in objs} == set(toydata.COLOURS)
    assert {len(s.objects) for s in data} == {1, 2, 3}
    assert {s.qtype for s in data} == set(toydata.QTYPES)
    for qtype in ("shape", "colour"):
        answers = {s.answer for s in data if s.qtype == qtype}
        assert answers == set(toydata.SHAPES if qtype == "shape" else toydata.COLOURS)
    assert {s.answer for s in data if s.qtype == "count"} == {"1", "2", "3"}


def test_questions_are_well_defined():
    for s in toydata.dataset(300, 3):
        assert s.image.size == (toydata.IMAGE_SIZE, toydata.IMAGE_SIZE)
        assert s.question == toydata.QUESTIONS[s.qtype]
        if s.qtype == "shape":
            assert {o.shape for o in s.objects} == {s.answer}
        elif s.qtype == "colour":
            assert {o.colour for o in s.objects} == {s.answer}
        elif s.qtype == "count":
            assert s.answer == str(len(s.objects))
        # objects never overlap
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1:]:
                gap = max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - (a.size + b.size) / 2
                assert gap >= 0


def test_describe_and_scoring():
    O = toydata.Obj
    objs = (O("star", "blue", 16, 10, 10), O("circle", "red", 16, 40, 40),
            O("star", "blue", 16, 40, 10))
    assert toydata.describe(objs) == "a red circle and two blue stars"
    assert toydata.describe((O("cross", "orange", 16, 10, 10),)) == "an orange cross"
    assert toydata.answers(objs) == {"count": "3", "describe": "a red circle and two blue stars"}
    assert toydata.is_correct(" Circle.", "circle") and not toydata.is_correct("circles", "circle")


def test_objects_are_drawn_in_their_colour():
    rng = random.Random(0)
    for colour, rgb in toydata.COLOURS.items():
        obj = toydata.Obj("square", colour, 20, 32, 32)
        img = toydata.render((obj,), toydata.BACKGROUNDS[0], rng)
        centre = img.getpixel((32, 32))
        assert max(abs(c - r) for c, r in zip(centre, rgb)) <= 12
        assert img.getpixel((2, 2)) == toydata.BACKGROUNDS[0]


def test_data_url_round_trip():
    s = toydata.dataset(1, 0)[0]
    url = toydata.image_to_data_url(s.image)
    assert url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    assert img.tobytes() == s.image.tobytes()


@pytest.mark.parametrize("style", [s for s in toydata.STYLES if s != "classic"])
def test_styles_are_deterministic_and_well_defined(style):
    a, b = toydata.dataset(40, 5, style), toydata.dataset(40, 5, style)
    assert [x.image.tobytes() for x in a] == [y.image.tobytes() for y in b]
    assert [x.image.tobytes() for x in a] != [y.image.tobytes()
                                               for y in toydata.dataset(40, 5, "solid"
                                                                        if style != "solid"
                                                                        else "outline")]
    st = toydata.STYLES[style]
    lines = []
    for s in a:
        assert s.style == style and s.image.size == (toydata.IMAGE_SIZE, toydata.IMAGE_SIZE)
        assert s.answer == toydata.answers(s.objects)[s.qtype]
        for i, o in enumerate(s.objects):
            assert o.size / 2 <= o.cx <= toydata.IMAGE_SIZE - o.size / 2
            assert o.size / 2 <= o.cy <= toydata.IMAGE_SIZE - o.size / 2
            assert 0.6 <= o.aspect <= 1.0 and 0 <= o.angle < 360
            lines.append(o.line)
            for p in s.objects[i + 1:]:
                assert max(abs(o.cx - p.cx), abs(o.cy - p.cy)) >= (o.size + p.size) / 2
    filled = sum(x == 0 for x in lines) / len(lines)
    assert filled == st.fill if st.fill in (0.0, 1.0) else 0.2 < filled < 0.8
    assert all(x == 0 or 1.5 <= x <= 3.0 for x in lines)


def test_classic_style_is_issue9s_drawing():
    """The default style draws what issue 9 drew: seed 0's sample is the README's triangle."""
    image, qa = toydata.sample_scene(0)
    assert qa == {toydata.QUESTIONS["shape"]: "triangle", toydata.QUESTIONS["colour"]: "black",
                  toydata.QUESTIONS["count"]: "1", toydata.QUESTIONS["describe"]:
                  "a black triangle"}
    assert all(s.style == "classic" and s.objects[0].line == 0 and s.objects[0].angle == 0
               for s in toydata.dataset(20, 0))


def test_heldout_style_is_never_trained():
    assert toydata.HELDOUT_STYLE in toydata.STYLES
    assert toydata.HELDOUT_STYLE not in toydata.TRAIN_STYLES
    seen = set()
    for index in (0, 1, 2, 999):
        batch = toydata.training_batch(0, index, 32)
        seen |= {s.style for s in batch}
        again = toydata.training_batch(0, index, 32)           # any order, same batch
        assert [s.image.tobytes() for s in batch] == [s.image.tobytes() for s in again]
    assert seen == set(toydata.TRAIN_STYLES)
    assert {s.style for s in toydata.dataset(30, 1, toydata.HELDOUT_STYLE)} == {"sketch"}
    assert all(o.line > 0 for s in toydata.dataset(30, 1, "sketch") for o in s.objects)


@pytest.mark.parametrize("style", [s for s in toydata.STYLES if s != "classic"])
def test_styled_objects_are_drawn_in_their_colour(style):
    """A filled square shows its colour at its centre; an outlined one on its rim, not
    inside (the median of a few pixels: noisy styles add pixel noise)."""
    import statistics

    for colour, rgb in toydata.COLOURS.items():
        for line in (0.0, 3.0):
            obj = toydata.Obj("square", colour, 36, 32, 32, angle=0.0, aspect=1.0, line=line)
            img = toydata.draw_scene((obj,), style, random.Random(colour))
            half = 36 / 2 / 2 ** 0.5 - line / 2        # the square's half side (less the line)
            rim = [(int(32 + half), y) for y in range(28, 37)]      # on the line's middle
            inside = [(x, y) for x in range(30, 35) for y in range(30, 35)]
            probe = inside if line == 0 else rim
            med = [statistics.median(img.getpixel(p)[c] for p in probe) for c in range(3)]
            tol = 20 + toydata.STYLES[style].noise / 2     # jitter 12, edges, noise
            assert max(abs(m - r) for m, r in zip(med, rgb)) <= tol, (colour, line, med)
            if line:
                med = [statistics.median(img.getpixel(p)[c] for p in inside) for c in range(3)]
                assert max(abs(m - r) for m, r in zip(med, rgb)) > 40, (colour, med)


def test_style_names_on_the_command_line(capsys):
    assert toydata.main(["6", "3", "--style", "heldout"]) == 0
    assert capsys.readouterr().out.count(toydata.HELDOUT_STYLE) == 6
    with pytest.raises(SystemExit):
        toydata.main(["--style", "cubist"])


@pytest.fixture(scope="module")
def toy_model():
    if not (TOY / "config.json").exists():
        pytest.skip("models/mmhpc-toy not built (python -m mmhpc.tools.train_toy)")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(TOY, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(TOY)
    return model, processor


def test_checkpoint_is_small_float32(toy_model):
    import torch
    model, _ = toy_model
    assert all(p.dtype == torch.float32 for p in model.parameters())
    size = sum(f.stat().st_size for f in TOY.iterdir() if f.is_file())
    assert size <= 25 * 2**20, size


def _assert_answers(model, processor, samples, at_least: int) -> None:
    """HF greedy generate answers ``at_least`` of the samples right."""
    from mmhpc.tools.train_toy import generate_answers

    preds = generate_answers(model, processor, samples)
    right = [toydata.is_correct(p, s.answer) for s, p in zip(samples, preds)]
    wrong = [(s.qtype, s.answer, p) for s, p, ok in zip(samples, preds, right) if not ok]
    assert sum(right) >= at_least, wrong


def test_toy_model_answers_fresh_questions(toy_model):
    model, processor = toy_model
    rng = random.Random(2024)   # never a training seed
    samples = [toydata.sample(rng, qtype=q) for q in ("shape", "colour", "count") for _ in range(8)]
    _assert_answers(model, processor, samples, 22)


def test_sample_cli_writes_one_image_and_its_answers(tmp_path, capsys):
    """`python -m mmhpc.tools.toydata --sample /tmp/shapes.png` (the README's first request)."""
    out = tmp_path / "shapes.png"
    assert toydata.main(["--sample", str(out)]) == 0
    image, qa = toydata.sample_scene(0)
    assert Image.open(out).convert("RGB").tobytes() == image.tobytes()
    assert set(qa) == set(toydata.QUESTIONS.values())       # one object: every question defined
    printed = capsys.readouterr().out
    for question, answer in qa.items():
        assert question in printed and answer in printed


def test_toy_model_answers_the_heldout_style(toy_model):
    """Issue 24 item 7: a model trained without the held-out drawing style answers shape and
    colour questions in it (train_toy scores 400 such images against the 95 % goal; here 24)."""
    import json

    info = json.loads((TOY / "toy_training.json").read_text())
    if info.get("heldout_style") != toydata.HELDOUT_STYLE:
        pytest.skip("models/mmhpc-toy predates the drawing styles (issue 9 training)")
    assert toydata.HELDOUT_STYLE not in info["train_styles"]
    model, processor = toy_model
    rng = random.Random(2024)   # never a training seed
    samples = [toydata.sample(rng, qtype=q, style=toydata.HELDOUT_STYLE)
               for q in ("shape", "colour") for _ in range(12)]
    _assert_answers(model, processor, samples, 22)


def test_train_toy_refuses_to_train_on_the_heldout_style(tmp_path):
    from mmhpc.tools.train_toy import train

    with pytest.raises(ValueError, match="held-out style"):
        train(tmp_path, styles=("classic", toydata.HELDOUT_STYLE))


@pytest.mark.slow
def test_train_toy_writes_the_heldout_goal(tmp_path):
    """A few steps of a tiny model (through the worker pool): toy_training.json has the
    classic, training-mix and held-out tables and the goal's verdict."""
    import json

    from mmhpc.tools.train_toy import GOAL, train

    sizes = dict(vision_hidden=32, vision_layers=1, hidden=32, layers=1, heads=2, kv_heads=1,
                 intermediate=64, vision_intermediate=64)
    info = train(tmp_path, steps=3, batch_size=4, eval_n=8, sizes=sizes, workers=1,
                 warmup=1, log_every=1)
    saved = json.loads((tmp_path / "toy_training.json").read_text())
    assert saved["heldout_style"] == toydata.HELDOUT_STYLE
    assert saved["train_styles"] == list(toydata.TRAIN_STYLES)
    assert set(saved["eval"]) == {"classic", "train", "heldout"}
    assert all(t["all"]["n"] == 8 for t in saved["eval"].values())
    g = saved["goal"]
    assert g["target"] == GOAL and g["pass"] == (min(g["shape"], g["colour"]) >= GOAL)
    assert set(saved["per_style"]) == set(toydata.STYLES)
    assert info["goal"] == g and (tmp_path / "model.safetensors").exists()

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


def test_toy_model_answers_fresh_questions(toy_model):
    from mmhpc.tools.train_toy import generate_answers

    model, processor = toy_model
    rng = random.Random(2024)   # never a training seed
    samples = [toydata.sample(rng, qtype=q) for q in ("shape", "colour", "count") for _ in range(8)]
    preds = generate_answers(model, processor, samples)
    right = [toydata.is_correct(p, s.answer) for s, p in zip(samples, preds)]
    wrong = [(s.qtype, s.answer, p) for s, p, ok in zip(samples, preds, right) if not ok]
    assert sum(right) >= 22, wrong


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

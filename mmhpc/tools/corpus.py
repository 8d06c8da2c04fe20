"""A small built-in English corpus: the tiny checkpoints train their BPE tokenizer on it."""
from __future__ import annotations

_COLOURS = "red green blue yellow orange purple pink brown black white grey gray cyan magenta gold silver"
_SHAPES = "circle square triangle rectangle star heart diamond oval hexagon pentagon cube sphere cone line dot"
_THINGS = ("cat dog bird fish horse cow sheep car bus train plane boat bike tree flower house door "
           "window table chair cup book phone lamp clock ball box bag hat shoe apple banana bread")

_TEXT = """\
The image shows a red circle on a white background. There is a blue square next to it.
What is in this picture? I can see a green triangle and a yellow star.
Describe the image in one sentence. A small black cat sits on a brown chair near the window.
How many shapes are there? There are three shapes: a circle, a square and a triangle.
What colour is the car? The car is red. The bus is yellow and the train is blue.
The photo was taken outside on a sunny day. The sky is blue and the grass is green.
A man is riding a bike down the street while a dog runs beside him.
The picture contains a purple hexagon, an orange pentagon and a pink heart.
Please describe what you see. I see a table with a cup, a book and a lamp on it.
Is there a person in the image? No, there are no people in the image, only a few trees.
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.
Answer the question about the image. The answer is yes. The answer is no.
User: what is the main object? Assistant: the main object is a large grey sphere.
Colours can be bright or dark, warm or cool. Red, orange and yellow are warm colours.
Blue, green and purple are cool colours. White and black are not really colours at all.
The left half of the image is dark and the right half is light. The top is bright.
There is text written at the bottom of the picture. It says hello world in big letters.
The model looks at the pixels, finds the edges, and then names the objects it can see.
A cube has six faces, a triangle has three sides, and a square has four equal sides.
Two birds are flying over the water. A boat is sailing near the shore at sunset.
The kitchen has a white door, a silver clock on the wall, and a bowl of apples and bananas.
I think the image shows a city street at night, with many lights and a few cars.
This is a simple drawing of a house with a red roof, two windows and a green door.
In the middle of the image there is a gold star; in the corner there is a small dot.
Thank you! You are welcome. Can you tell me more? Sure, here is a longer description.
The numbers 0 1 2 3 4 5 6 7 8 9 10 12 16 32 64 100 appear on the sign.
Yes. No. Maybe. Hello, how are you today? I am fine, thank you for asking.
"""


def corpus_lines() -> list[str]:
    """The training text, one sentence or word list a line, repeated with small variations."""
    lines = _TEXT.splitlines()
    words = _COLOURS.split() + _SHAPES.split() + _THINGS.split()
    lines += [" ".join(words), " ".join(w.capitalize() for w in words)]
    for colour in _COLOURS.split():
        for shape in _SHAPES.split()[:8]:
            lines.append(f"a {colour} {shape}. The {shape} is {colour}.")
    return lines

"""Sort-of-CLEVR-style synthetic VQA in the LLaVA format, drawn with Pillow.

Each image holds a few shapes of distinct colours, each filling one cell of a
4x4 grid. The data is shaped like LLaVA-1.5's, so that what STS saves here is what it
saves there: alignment reads a short caption per image (LCS-558K: ~93% of the language
model's tokens are visual; here 86%), instruction tuning a multi-turn conversation of
two questions (LLaVA-665K: ~70% visual; here 71%). The test set asks every question type
equally often. Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from sts.cli.recipes import ConfigError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
QUESTION_TYPES = ("colour", "shape", "count", "exist", "position")
GRID = 4  # cells per side; one object per cell
IMAGE_SIZE = 64
CELL = IMAGE_SIZE // GRID
BACKGROUND = (245, 245, 245)
MIN_OBJECTS, MAX_OBJECTS = 3, 5


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    row: int
    col: int


def draw_scene(objects: list[SceneObject], size: int = IMAGE_SIZE) -> Image.Image:
    """The scene at `size` px a side (the same drawing at any multiple of IMAGE_SIZE)."""
    scale, cell = size // IMAGE_SIZE, size // GRID
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    margin = scale
    for obj in objects:
        x0, y0 = obj.col * cell + margin, obj.row * cell + margin
        x1, y1 = x0 + cell - 2 * margin - 1, y0 + cell - 2 * margin - 1
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            pen.rectangle((x0 + scale, y0 + scale, x1 - scale, y1 - scale), fill=fill)
        else:
            pen.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)
    return image


def random_scene(rng: random.Random) -> list[SceneObject]:
    """A scene with distinct colours and at least one shape that occurs once
    (so a colour-of-shape question has a single answer)."""
    while True:
        count = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
        colours = rng.sample(list(COLOURS), count)
        cells = rng.sample(range(GRID * GRID), count)
        objects = [
            SceneObject(colour, rng.choice(SHAPES), cell // GRID, cell % GRID) for colour, cell in zip(colours, cells)
        ]
        shapes = [o.shape for o in objects]
        if any(shapes.count(s) == 1 for s in SHAPES):
            return objects


def ask(kind: str, objects: list[SceneObject], rng: random.Random) -> tuple[str, str]:
    """One (question, answer) of the given type about the scene."""
    shapes = [o.shape for o in objects]
    if kind == "colour":
        obj = rng.choice([o for o in objects if shapes.count(o.shape) == 1])
        return f"What color is the {obj.shape}?", obj.colour
    if kind == "shape":
        obj = rng.choice(objects)
        return f"What shape is the {obj.colour} object?", obj.shape
    if kind == "count":
        shape = rng.choice(SHAPES)
        return f"How many {shape}s are there?", str(shapes.count(shape))
    if kind == "exist":
        present = {(o.colour, o.shape) for o in objects}
        if rng.random() < 0.5:
            colour, shape = rng.choice(sorted(present))
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            colour, shape = rng.choice(absent)
        answer = "yes" if (colour, shape) in present else "no"
        return f"Is there a {colour} {shape}?", answer
    if kind == "position":
        obj = rng.choice(objects)
        # The question never names its answers: with "left or right?" in the prompt the model
        # can copy either word from the question, and position stayed at chance.
        return f"Which side is the {obj.colour} object on?", side_of(obj.col)
    raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")


def side_of(col: int) -> str:
    """The answer to a position question: the half of the grid a column lies in."""
    return "left" if col < GRID // 2 else "right"


def caption(objects: list[SceneObject]) -> str:
    """What alignment learns to say: every object, colour then shape, in reading order."""
    ordered = sorted(objects, key=lambda o: (o.row, o.col))
    return " ".join(f"{o.colour} {o.shape}" for o in ordered)


def question_kinds(index: int, questions: int, rng: random.Random) -> list[str]:
    """`questions` distinct types for record `index`, cycling so that every type is asked
    equally often over the split (each type once per len(QUESTION_TYPES) records, if one each)."""
    if questions >= len(QUESTION_TYPES):
        kinds = list(QUESTION_TYPES) * (questions // len(QUESTION_TYPES))
        kinds += rng.sample(QUESTION_TYPES, questions % len(QUESTION_TYPES))
    else:
        start = index * questions
        kinds = [QUESTION_TYPES[(start + k) % len(QUESTION_TYPES)] for k in range(questions)]
    rng.shuffle(kinds)
    return kinds


def make_record(
    index: int, split: str, rng: random.Random, questions: int, image_size: int = IMAGE_SIZE
) -> tuple[dict, Image.Image]:
    """One image and its record: a caption (`questions` 0) or a conversation of `questions` turns."""
    objects = random_scene(rng)
    if questions == 0:
        conversations = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(objects)}]
        return image_record(index, split, objects, conversations), draw_scene(objects, image_size)
    conversations = []
    for turn, kind in enumerate(question_kinds(index, questions, rng)):
        question, answer = ask(kind, objects, rng)
        prompt = f"<image>\n{question}" if turn == 0 else question
        conversations.append({"from": "human", "value": prompt, "type": kind})
        conversations.append({"from": "gpt", "value": answer})
    return image_record(index, split, objects, conversations), draw_scene(objects, image_size)


def image_record(index: int, split: str, objects: list[SceneObject], conversations: list[dict]) -> dict:
    return {
        "id": f"{split}-{index:06d}",
        "image": f"images/{split}-{index:06d}.png",
        "conversations": conversations,
        "scene": [asdict(o) for o in objects],
    }


def write_split(out: Path, split: str, count: int, seed: int, questions: int, image_size: int = IMAGE_SIZE) -> Path:
    rng = random.Random(f"{seed}-{split}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in tqdm(range(count), desc=f"synth {split}", leave=False):
        record, image = make_record(index, split, rng, questions, image_size)
        image.save(out / record["image"])
        records.append(record)
    path = out / f"{split}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def generate(
    out: str | Path,
    train: int,
    test: int,
    seed: int = 0,
    questions: int = 2,
    align: int = 0,
    image_size: int = IMAGE_SIZE,
) -> dict[str, Path]:
    """Write DIR/train.json and DIR/test.json (conversations of `questions` turns, each of a
    distinct type while there are types left), DIR/align.json if `align` (caption records) and
    DIR/images/ (`image_size` px a side: a multiple of IMAGE_SIZE; the scenes do not depend on it)."""
    if train < 1 or test < 1 or questions < 1 or align < 0:
        raise ConfigError(
            f"--train, --test and --questions must be positive and --align not negative, "
            f"got {train}, {test}, {questions} and {align}"
        )
    if image_size < IMAGE_SIZE or image_size % IMAGE_SIZE:
        raise ConfigError(f"--image-size {image_size}: must be a multiple of {IMAGE_SIZE} px")
    out = Path(out)
    paths = {"align": write_split(out, "align", align, seed, 0, image_size)} if align else {}
    return paths | {
        "train": write_split(out, "train", train, seed, questions, image_size),
        "test": write_split(out, "test", test, seed, questions, image_size),
    }


def answer_words() -> dict[str, set[str]]:
    """Question type -> the words that answer it (each word answers one type only)."""
    return {
        "colour": set(COLOURS),
        "shape": set(SHAPES),
        "count": {str(n) for n in range(MAX_OBJECTS + 1)},
        "exist": {"yes", "no"},
        "position": {"left", "right"},
    }


def vocabulary() -> list[str]:
    """Every word the generator and the chat template can write, for the tiny tokenizer."""
    words = set().union(*answer_words().values()) | {f"{s}s" for s in SHAPES}
    words |= {
        "What",
        "color",
        "is",
        "the",
        "shape",
        "object",
        "How",
        "many",
        "are",
        "there",
        "Is",
        "a",
        "on",
        "Which",
        "side",
        "?",
    }
    return sorted(words)

"""What can be wrong with LLaVA data, checked before it costs a training run.

Shared by `sts data check` (every bad record of a file, up front), training
(`LlavaDataset.validate()`) and evaluation. Each check returns what is wrong as a short phrase,
or None; `record_problem` puts the file, the record and its id in front:
`data/train.json, record 17 (id 000017): 2 <image> placeholders but 1 image`. What shows only
when a record is encoded (an unreadable image, a sample too long for `max_length`) is raised
where it is encoded, in `sts.cli.data.llava`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from sts.cli.data.records import (
    IMAGE_PLACEHOLDER,
    DataError,
    RecordError,
    Records,
    image_paths,
    open_image,
    shown,
    where,
)

SPEAKERS = ("human", "gpt")  # in this order, alternating


def record_problem(
    records: Records, number: int, images_dir: Path, image_problem: Callable[[str], str | None] | None = None
) -> str | None:
    """What is wrong with record `number`, as a message naming it, or None: the checks that decode
    no image, then `image_problem` (what is wrong with an image path) for each of its images."""
    try:
        record = records[number]
    except DataError as error:
        return str(error)
    problem = content_problem(record, images_dir)
    if problem is None and image_problem is not None:
        problem = next(filter(None, map(image_problem, image_paths(record))), None)
    return None if problem is None else f"{where(records.path, number, record)}: {problem}"


def content_problem(record: dict, images_dir: Path) -> str | None:
    """The first thing wrong with a parsed record that shows without decoding its images."""
    return (
        conversation_problem(record["conversations"])
        or image_path_problem(record, images_dir)
        or placeholder_problem(record)
    )


def conversation_problem(turns: list) -> str | None:
    """Turns are `{from, value}`, from human and gpt in turn (human first), every answer non-empty."""
    if not turns:
        return "'conversations' is empty"
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or not isinstance(turn.get("value"), str):
            return f'turn {k} is not {{"from": ..., "value": "<text>"}}'
        if turn["from"] not in SPEAKERS:
            return f"turn {k} is from {turn['from']!r}; expected 'human' or 'gpt'"
        if turn["from"] != SPEAKERS[k % 2]:
            return f"turn {k} is from {turn['from']!r} where {SPEAKERS[k % 2]!r} should be (human, gpt, human, ...)"
        if turn["from"] == "gpt" and not turn["value"].strip():
            return f"turn {k} is an empty answer"
    if len(turns) == 1:
        return "no answer: no 'gpt' turn"
    return None


def image_path_problem(record: dict, images_dir: Path) -> str | None:
    """`image` is a path or a list of paths, each relative to the image folder, not leaving it (checked
    on the path itself, so that a folder linking elsewhere stays allowed), to a file that exists."""
    image = record.get("image")
    listed = image if isinstance(image, list) else [] if image is None else [image]
    if not all(isinstance(path, str) for path in listed):
        return "'image' is neither a path nor a list of paths"
    for path in image_paths(record):
        if Path(path).is_absolute():
            return f"image path {shown(path)} is absolute; it must be relative to the image folder {images_dir}"
        if Path(os.path.normpath(path)).parts[:1] == ("..",):
            return f"image path {shown(path)} leaves the image folder {images_dir}"
        if not (images_dir / path).is_file():
            return f"image {shown(path)} not found in {images_dir}"
    return None


def placeholder_problem(record: dict) -> str | None:
    """Each `<image>` placeholder needs an image; images without a placeholder are allowed only when no
    turn has one (`to_messages` then puts them all in the first user turn)."""
    placeholders = sum(
        turn["value"].count(IMAGE_PLACEHOLDER) for turn in record["conversations"] if turn["from"] == "human"
    )
    images = len(image_paths(record))
    if placeholders > images or 0 < placeholders < images:
        return f"{plural(placeholders, IMAGE_PLACEHOLDER + ' placeholder')} but {plural(images, 'image')}"
    return None


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def unreadable_image(images_dir: Path, path: str) -> str | None:
    """What Pillow says of an image it cannot decode (corrupt, truncated, not an image), or None."""
    try:
        open_image(images_dir, path)
    except RecordError as error:
        return str(error)
    return None


def problems(
    records: Records, images_dir: Path, count: int | None = None, encode: Callable[[int], object] | None = None
) -> Iterator[str]:
    """One message per bad record among the first `count` (all by default), as they are checked:
    the checks that decode no image, each distinct image decoded once, then `encode(number)` if
    given (training's own encoding, which raises a DataError for a sample too long)."""
    image_problem = functools.cache(functools.partial(unreadable_image, images_dir))
    for number in tqdm(range(len(records) if count is None else count), desc="checking", leave=False):
        problem = record_problem(records, number, images_dir, image_problem)
        if problem is None and encode is not None:
            try:
                encode(number)
            except DataError as error:
                problem = str(error)
        if problem is not None:
            yield problem


def load_processor(model: str | None):
    """The processor of a local checkpoint folder, or the embedded tiny model's."""
    if model is None:
        from sts.cli.models.tiny import build_processor

        return build_processor()
    if not Path(model).is_dir():
        raise FileNotFoundError(f"--model {model}: no such checkpoint folder")
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model)

"""LLaVA-format data for any transformers multimodal processor.

A record is `{id, image, conversations: [{from: human|gpt, value}, ...]}`; `image` is a path, a
list of paths or absent (text only), and `<image>` placeholders in human turns say where each
goes. The text comes from the processor's own chat template and the image
tokens are expanded by the processor itself, so the same code serves the tiny model and a
real checkpoint. Labels cover only the assistant's answers (and their end-of-turn token).

Two formats, as LLaVA-1.5 trains: `chat` (the processor's chat template; instruction tuning)
and `plain` (alignment on captions: the images, then the first answer and the end-of-sequence
token, no template and no instruction, so almost every token the language model reads is
visual).
"""

from __future__ import annotations

import codecs
import json
import logging
import multiprocessing
import os
import re
from array import array
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from sts.distributed import is_main

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
logger = logging.getLogger("sts.data")


class DataError(ValueError):
    """Data that cannot be used; the message names the file and the record."""

    @property
    def headline(self) -> str:
        """The one-line message, also when PyTorch re-raised this error from a DataLoader worker
        with the worker's traceback around it (whose last line is `...DataError: <message>`)."""
        return str(self).rstrip().rpartition("DataError: ")[2]


class RecordError(ValueError):
    """What is wrong with one record, said without where it is: whoever reads the record re-raises
    it as a DataError naming the file and the record (see `located`)."""


def where(path: Path, number: int, record: dict | None = None) -> str:
    """`data/train.json, record 17 (id 000017)`: how every message about a record starts."""
    named = isinstance(record, dict) and "id" in record
    return f"{path}, record {number}" + (f" (id {record['id']})" if named else "")


@contextmanager
def located(path: Path, number: int, record: dict):
    """Turn a RecordError raised inside into a DataError naming the file and the record."""
    try:
        yield
    except RecordError as error:
        raise DataError(f"{where(path, number, record)}: {error}") from None


def image_paths(record: dict) -> list[str]:
    """A record's images: `image` is one path, a list of paths, or absent (text only)."""
    image = record.get("image")
    return [] if not image else [image] if isinstance(image, str) else list(image)


def to_messages(conversations: list[dict], images: int) -> list[dict]:
    """LLaVA turns -> chat-template messages. Each `<image>` placeholder becomes an image part of
    its turn; images no placeholder names go with the first user turn (LLaVA's convention)."""
    messages, placed = [], sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conversations if t["from"] == "human")
    unplaced = max(images - placed, 0)
    for turn in conversations:
        text = turn["value"].replace(IMAGE_PLACEHOLDER, "").strip()
        if turn["from"] == "human":
            count = turn["value"].count(IMAGE_PLACEHOLDER) + (unplaced if not messages else 0)
            content = [{"type": "image"}] * count + [{"type": "text", "text": text}]
            messages.append({"role": "user", "content": content})
        elif turn["from"] == "gpt":
            messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        else:
            raise RecordError(f"unknown speaker {turn['from']!r}; expected 'human' or 'gpt'")
    return messages


def answer_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full conversation text and the character span of each assistant answer."""
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(messages[:k], add_generation_prompt=True)
        upto = processor.apply_chat_template(messages[: k + 1])
        if not upto.startswith(prompt):
            raise RecordError("the chat template does not render a conversation prefix-stably")
        spans.append((len(prompt), len(upto)))
    return processor.apply_chat_template(messages), spans


def plain_spans(processor, record: dict, images: int) -> tuple[str, list[tuple[int, int]]]:
    """LLaVA's `plain` text of a record: its images' markup, then its first answer and the
    end-of-sequence token, which is the one span trained on."""
    answers = [turn["value"].strip() for turn in record["conversations"] if turn["from"] == "gpt"]
    if not answers:
        raise RecordError("no 'gpt' turn, which the plain format trains on")
    eos = processor.tokenizer.eos_token
    prefix = image_markup(processor) * images
    return prefix + answers[0] + eos, [(len(prefix), len(prefix) + len(answers[0]) + len(eos))]


def image_markup(processor) -> str:
    """What the processor's chat template writes for one image (`<image>\n` for LLaVA,
    `<|vision_start|><|image_pad|><|vision_end|>` for Qwen-VL, whose positions need the
    delimiters): the difference between a user turn with the image and one without."""
    def render(content: list[dict]) -> str:
        return processor.apply_chat_template([{"role": "user", "content": content + [{"type": "text", "text": "x"}]}])

    with_image, without = render([{"type": "image"}]), render([])
    start = len(os.path.commonprefix([with_image, without]))
    end = len(os.path.commonprefix([with_image[start:][::-1], without[start:][::-1]]))
    return with_image[start:len(with_image) - end]


def render(processor, record: dict, images: int, template: str) -> tuple[str, list[tuple[int, int]]]:
    """A record's whole text in `template` (chat or plain), and the character spans trained on."""
    if template == "plain":
        return plain_spans(processor, record, images)
    return answer_spans(processor, to_messages(record["conversations"], images))


def open_image(images_dir: Path, relative: str) -> Image.Image:
    """An image as RGB; one that Pillow cannot read (corrupt, truncated, not an image) is a RecordError."""
    try:
        with Image.open(images_dir / relative) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise RecordError(f"image {relative} cannot be read ({error})") from None


def encode(processor, record: dict, images_dir: Path, template: str = "chat") -> dict[str, torch.Tensor]:
    """Token ids, labels, image inputs and any other per-token inputs (e.g. `mm_token_type_ids`)
    of one record in `template` (chat or plain); per-token inputs are 1-D, image inputs as the
    processor returns them."""
    paths = image_paths(record)
    text, spans = render(processor, record, len(paths), template)
    images = [open_image(images_dir, path) for path in paths]
    inputs = dict(processor(text=text, images=images or None, return_tensors="pt"))
    input_ids = inputs.pop("input_ids")[0]
    inputs.pop("attention_mask", None)
    inputs.pop("token_type_ids", None)
    tokenizer = processor.tokenizer

    expanded = expanded_positions(tokenizer(text)["input_ids"], input_ids.tolist(), visual_token_ids(processor))

    def position(chars: int) -> int:
        """Where the text's first `chars` characters end among the expanded tokens."""
        return expanded[len(tokenizer(text[:chars])["input_ids"])]

    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for start, end in spans:
        labels[position(start):position(end)] = input_ids[position(start):position(end)]
    per_token = {k: v[0] for k, v in inputs.items() if v.dim() == 2 and v.shape == (1, len(input_ids))}
    return {"input_ids": input_ids, "labels": labels, **inputs, **per_token}


def visual_token_ids(processor) -> set[int]:
    """The ids of the placeholder tokens the processor expands into an image's (or video's) tokens."""
    tokens = [getattr(processor, name, None) for name in ("image_token", "video_token")]
    return {processor.tokenizer.convert_tokens_to_ids(token) for token in tokens if token}


def expanded_positions(text_ids: list[int], input_ids: list[int], visual: set[int]) -> list[int]:
    """For each position of the text's own tokens (and one past the end), its position once the
    processor has expanded every image placeholder into its tokens, so that an answer after an
    image, between images or before one is labelled where it lands. Adjacent placeholders share
    their run of visual tokens evenly (images of one resolution)."""
    positions, i, j = [], 0, 0
    while j < len(text_ids):
        if text_ids[j] not in visual:
            if i >= len(input_ids) or input_ids[i] != text_ids[j]:
                raise RecordError("the processor's image tokens do not line up with the text's placeholders")
            positions.append(i)
            i, j = i + 1, j + 1
            continue
        placeholders = next((k for k in range(j, len(text_ids)) if text_ids[k] not in visual), len(text_ids)) - j
        run = next((k for k in range(i, len(input_ids)) if input_ids[k] not in visual), len(input_ids)) - i
        positions += [i + q * run // placeholders for q in range(placeholders)]
        i, j = i + run, j + placeholders
    return positions + [len(input_ids)]


STRUCTURE = re.compile(rb'[{}"\\]')  # the only bytes that decide where a JSON object starts and ends
WHITESPACE = b" \t\r\n"
SEPARATORS = WHITESPACE + b","  # all that may stand between the records of the list
CHUNK = 1 << 24  # bytes read at a time while indexing


class Records:
    """The records of a LLaVA JSON list, read lazily: one streaming pass finds where each
    top-level object starts and ends, and a record is parsed when it is asked for, so memory
    does not grow with the file (two 8-byte offsets a record), in every DataLoader worker."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no data file at {self.path}")
        self.starts, self.ends = array("q"), array("q")
        with open(self.path, "rb") as file:
            self.scan(file)
        self.file = None

    def scan(self, file) -> None:
        """Find where each record starts and ends, checking on the way that the file is one list
        of objects: between the records only separators (`stray` collects anything else), and its
        closing bracket after the last."""
        offset = self.skip_opening_bracket(file)
        # `outside`: where the bytes between two records (or before the first) began.
        depth, in_string, escaped_at, outside, stray = 0, False, -1, offset, b""
        while chunk := file.read(CHUNK):
            for match in STRUCTURE.finditer(chunk):
                at, char = offset + match.start(), match.group()
                if in_string:
                    if at == escaped_at:
                        continue
                    if char == b"\\":
                        escaped_at = at + 1
                    elif char == b'"':
                        in_string = False
                elif char == b'"':
                    in_string = True
                elif char == b"{":
                    if depth == 0:
                        stray += chunk[outside - offset:at - offset].translate(None, SEPARATORS)
                        if stray:
                            raise self.not_a_list(stray)
                        self.starts.append(at)
                    depth += 1
                elif char == b"}":
                    depth -= 1
                    if depth == 0:
                        self.ends.append(at + 1)
                        outside = at + 1
            if depth == 0:
                stray += chunk[outside - offset:].translate(None, SEPARATORS)
                outside = offset + len(chunk)
                if stray not in (b"", b"]"):
                    raise self.not_a_list(stray)
            offset += len(chunk)
        if depth != 0 or in_string:
            raise DataError(f"{self.path} is not a JSON list of LLaVA records: an object or string is left open "
                            "at the end (is the file cut short?)")
        if not self.starts:
            raise DataError(f"{self.path} holds no LLaVA records (an empty list)")
        if stray != b"]":
            raise DataError(f"{self.path} is not a JSON list of LLaVA records: no ']' closes it after record "
                            f"{len(self.starts) - 1} (is the file cut short?)")

    def skip_opening_bracket(self, file) -> int:
        """The offset just after the list's `[`, which must be the first byte but whitespace (and
        a UTF-8 byte-order mark)."""
        if file.read(3) != codecs.BOM_UTF8:
            file.seek(0)
        first = file.read(1)
        while first and first in WHITESPACE:
            first = file.read(1)
        if not first:
            raise DataError(f"{self.path} is empty")
        if first != b"[":
            found = first.decode("utf-8", "replace")
            raise DataError(f"{self.path} is not a JSON list of LLaVA records: it starts with {found!r}, not '['")
        return file.tell()

    def not_a_list(self, stray: bytes) -> DataError:
        """The error for something other than an object in the list (or after its end)."""
        place = f"after record {len(self.starts) - 1}" if self.starts else "before the first record"
        found = stray[:20].decode("utf-8", "replace")
        what = "the list's closing ']' comes before more data" if stray.startswith(b"]") \
            else f"{found!r}... is not a record (a JSON object)"
        return DataError(f"{self.path} is not a JSON list of LLaVA records: {place}, {what}")

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict:
        if self.file is None:
            self.file = open(self.path, "rb")
        # A positional read: forked DataLoader workers share the handle, and a seek would race.
        raw = os.pread(self.file.fileno(), self.ends[index] - self.starts[index], self.starts[index])
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise DataError(f"{where(self.path, index)}: not UTF-8 text (byte {self.starts[index] + error.start} "
                            f"of the file is {raw[error.start:error.start + 1]!r})") from None
        except json.JSONDecodeError as error:
            raise DataError(f"{where(self.path, index)}: not valid JSON ({error.msg}, line {error.lineno} "
                            f"column {error.colno} of the record)") from None
        if not isinstance(record.get("conversations"), list):
            raise DataError(f"{where(self.path, index, record)}: no 'conversations' list")
        return record

    def __getstate__(self):  # a spawned worker opens the file itself
        return {**self.__dict__, "file": None}


class LlavaDataset(Dataset):
    """Records of a LLaVA JSON file, encoded by `processor` when asked for (in the DataLoader's
    workers). `cache` keeps every encoded record, pixels included: for small data only (the
    demo), where encoding would otherwise be paid again every epoch. `max_length` truncates a
    sample's text after its last image token, never inside an image's tokens.

    A bad record raises a DataError naming it (`on_bad_sample="error"`), or with "skip" is logged
    and left out: `validate()` finds what shows without decoding images up front and drops those
    records; one found bad only while encoding (an unreadable image, too long for `max_length`)
    is replaced by the next record that encodes, so that every batch keeps its size (on every
    rank of a distributed run). `skipped` counts both."""

    def __init__(self, path: str | Path, processor, images: str | Path | None = None, template: str = "chat",
                 cache: bool = False, max_length: int | None = None, on_bad_sample: str = "error"):
        self.records = Records(path)
        self.images_dir = Path(images) if images else Path(path).parent
        self.processor = processor
        self.template = template
        self.max_length = max_length
        self.on_bad_sample = on_bad_sample
        self.cache: dict[int, dict | None] | None = {} if cache else None
        self.kept: range | array = range(len(self.records))  # the record number of each sample
        # One flag a record, in memory shared with the DataLoader's workers, which find some bad ones.
        self.bad = multiprocessing.RawArray("b", len(self.records))

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for offset in range(len(self.kept)):  # a record bad while encoding: the next good one instead
            sample = self.sample(self.kept[(index + offset) % len(self.kept)])
            if sample is not None:
                return sample
        raise DataError(f"{self.records.path}: none of its records can be encoded (the warnings name them)")

    def sample(self, number: int) -> dict[str, torch.Tensor] | None:
        """Record `number` encoded (from the cache, if any), or None if it is bad and skipped."""
        if self.cache is not None and number in self.cache:
            return self.cache[number]
        sample = self.encoded(number, self.max_length)
        if self.cache is not None:
            self.cache[number] = sample
        return sample

    @property
    def skipped(self) -> int:
        """Records left out as bad: by `validate()` and while encoding (in any DataLoader worker)."""
        return sum(self.bad)

    def validate(self) -> None:
        """Run the checks that decode no image over every record now, so that a bad record stops
        the run before it trains (error) or is left out of it (skip), not found hours in."""
        from sts.data.check import record_problem  # sts.data.check builds on this module

        kept = array("q")
        for number in tqdm(range(len(self.records)), desc="checking data", leave=False, disable=not is_main()):
            problem = record_problem(self.records, number, self.images_dir)
            if problem is None:
                kept.append(number)
            else:
                self.reject(number, problem)
        if not kept:
            raise DataError(f"{self.records.path}: every one of its {len(self.records)} records is bad")
        self.kept = kept

    def reject(self, number: int, problem: str) -> None:
        """A bad record: a DataError, or with on_bad_sample skip a warning, and it is skipped."""
        if self.on_bad_sample == "error":
            raise DataError(problem) from None
        logger.warning("skipped %s", problem)
        self.bad[number] = 1

    def encoded(self, number: int, max_length: int | None) -> dict[str, torch.Tensor] | None:
        """Record `number` encoded and, given `max_length`, truncated; None if it is bad and skipped."""
        if self.bad[number]:
            return None
        try:
            record = self.records[number]
            with located(self.records.path, number, record):
                sample = encode(self.processor, record, self.images_dir, self.template)
                return sample if max_length is None else truncate(sample, max_length, self.processor)
        except DataError as error:
            self.reject(number, str(error))
            return None

    def lengths(self) -> list[int]:
        """Each sample's token count without encoding its images: the text as the template writes
        it, tokenized, plus each image's tokens as the first image-bearing record expands them
        (exact for fixed-resolution processors, an estimate for dynamic ones); for batching
        records of similar lengths."""
        texts, images = [], []
        for number in tqdm(self.kept, desc="lengths", leave=False, disable=not is_main()):
            record = self.records[number]
            images.append(len(image_paths(record)))
            with located(self.records.path, number, record):
                texts.append(render(self.processor, record, images[-1], self.template)[0])
        per_image = self.tokens_per_image(images)
        counts = [len(ids) for ids in self.processor.tokenizer(texts)["input_ids"]]
        return [n + k * per_image for n, k in zip(counts, images)]

    def tokens_per_image(self, images: list[int]) -> int:
        """How many tokens one image adds beyond its placeholder, from the first sample with images
        that encodes (each sample's image count in `images`)."""
        for number, count in zip(self.kept, images):
            sample = self.encoded(number, max_length=None) if count else None
            if sample is not None:
                text, _ = render(self.processor, self.records[number], count, self.template)
                return (len(sample["input_ids"]) - len(self.processor.tokenizer(text)["input_ids"])) // count
        return 0

    def encode_all(self) -> None:
        """Encode (and cache) every record now, so that training time measures training, not one
        epoch of image preprocessing paid by whichever stage happens to come first."""
        for index in tqdm(range(len(self)), desc="encoding", leave=False, disable=not is_main()):
            self[index]


def truncate(sample: dict[str, torch.Tensor], max_length: int, processor) -> dict[str, torch.Tensor]:
    """Cut a sample's per-token tensors at `max_length`, or just after its last image token if
    that comes later: an image's tokens and its pixel inputs always stay whole. A sample whose
    images alone are longer than `max_length`, or that the cut leaves nothing to train on, is a
    RecordError."""
    ids = sample["input_ids"]
    visual = torch.isin(ids, torch.tensor(sorted(visual_token_ids(processor)))).nonzero()
    if len(visual) > max_length:
        raise RecordError(f"its images take {len(visual)} tokens, more than max_length {max_length}")
    keep = max(max_length, int(visual[-1]) + 1 if len(visual) else 0)
    if keep >= len(ids):
        return sample
    trained = (sample["labels"] != IGNORE_INDEX).nonzero()
    if not len(trained) or int(trained[0]) >= keep:
        first = f" (the first answer starts at token {int(trained[0])})" if len(trained) else ""
        raise RecordError(f"max_length {max_length} leaves nothing to train on{first}")
    return {key: value[:keep] if value.dim() == 1 and len(value) == len(ids) else value
            for key, value in sample.items()}


class Collator:
    """Right-pads ids (pad token) and labels (ignored); concatenates image inputs."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(s["input_ids"]) for s in samples)
        batch = {
            "input_ids": torch.full((len(samples), length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(samples), length), dtype=torch.long),
        }
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            batch["input_ids"][row, :n] = sample["input_ids"]
            batch["labels"][row, :n] = sample["labels"]
            batch["attention_mask"][row, :n] = 1
        for key in sorted({k for s in samples for k in s} - set(batch)):
            present = [s for s in samples if key in s]
            if all(s[key].dim() == 1 and len(s[key]) == len(s["input_ids"]) for s in present):
                batch[key] = torch.zeros((len(samples), length), dtype=present[0][key].dtype)  # per token: padded
                for row, sample in enumerate(samples):
                    if key in sample:
                        batch[key][row, : len(sample[key])] = sample[key]
            else:
                batch[key] = torch.cat([s[key] for s in present])  # per image: concatenated
        return batch

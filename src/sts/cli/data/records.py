"""LLaVA-format records, read lazily, and what reading them can raise.

A record is `{id, image, conversations: [{from: human|gpt, value}, ...]}`; `image` is a path, a
list of paths or absent (text only), and `<image>` placeholders in human turns say where each
goes. Every message about a record names the file and the record (`where`).
"""

from __future__ import annotations

import codecs
import json
import os
import re
from array import array
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"


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


def shown(value) -> str:
    """A value from the user's data in a message: as it is when it is one printable line of text,
    else by repr (so that a newline in an id cannot split a one-line error or forge another)."""
    return value if isinstance(value, str) and value.isprintable() else repr(value)


def where(path: Path, number: int, record: dict | None = None) -> str:
    """`data/train.json, record 17 (id 000017)`: how every message about a record starts."""
    named = isinstance(record, dict) and "id" in record
    return f"{path}, record {number}" + (f" (id {shown(record['id'])})" if named else "")


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


def open_image(images_dir: Path, relative: str) -> Image.Image:
    """An image as RGB; one that Pillow cannot read (corrupt, truncated, not an image) is a RecordError."""
    try:
        with Image.open(images_dir / relative) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise RecordError(f"image {shown(relative)} cannot be read ({error})") from None


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
                        stray += chunk[outside - offset : at - offset].translate(None, SEPARATORS)
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
                stray += chunk[outside - offset :].translate(None, SEPARATORS)
                outside = offset + len(chunk)
                if stray not in (b"", b"]"):
                    raise self.not_a_list(stray)
            offset += len(chunk)
        if depth != 0 or in_string:
            raise DataError(
                f"{self.path} is not a JSON list of LLaVA records: an object or string is left open "
                "at the end (is the file cut short?)"
            )
        if not self.starts:
            raise DataError(f"{self.path} holds no LLaVA records (an empty list)")
        if stray != b"]":
            raise DataError(
                f"{self.path} is not a JSON list of LLaVA records: no ']' closes it after record "
                f"{len(self.starts) - 1} (is the file cut short?)"
            )

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
        what = (
            "the list's closing ']' comes before more data"
            if stray.startswith(b"]")
            else f"{found!r}... is not a record (a JSON object)"
        )
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
            raise DataError(
                f"{where(self.path, index)}: not UTF-8 text (byte {self.starts[index] + error.start} "
                f"of the file is {raw[error.start : error.start + 1]!r})"
            ) from None
        except json.JSONDecodeError as error:
            raise DataError(
                f"{where(self.path, index)}: not valid JSON ({error.msg}, line {error.lineno} "
                f"column {error.colno} of the record)"
            ) from None
        except ValueError as error:  # an integer of thousands of digits
            raise DataError(f"{where(self.path, index)}: cannot be read ({str(error).split(';')[0]})") from None
        except RecursionError:
            raise DataError(f"{where(self.path, index)}: cannot be read (nested too deeply)") from None
        if not isinstance(record.get("conversations"), list):
            raise DataError(f"{where(self.path, index, record)}: no 'conversations' list")
        return record

    def __getstate__(self):  # a spawned worker opens the file itself
        return {**self.__dict__, "file": None}

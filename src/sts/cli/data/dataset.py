"""The Dataset of a LLaVA JSON file: records encoded when a batch asks for them, bad ones
stopped or skipped, samples truncated without cutting an image."""

from __future__ import annotations

import logging
import multiprocessing
from array import array
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from sts.cli.data.check import record_problem
from sts.cli.data.records import DataError, RecordError, Records, image_paths, located
from sts.cli.data.render import encode, render, visual_token_ids
from sts.cli.distributed import is_main
from sts.cut import IGNORE_INDEX

logger = logging.getLogger("sts.cli.data")


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

    def __init__(
        self,
        path: str | Path,
        processor,
        images: str | Path | None = None,
        template: str = "chat",
        cache: bool = False,
        max_length: int | None = None,
        on_bad_sample: str = "error",
    ):
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
    return {
        key: value[:keep] if value.dim() == 1 and len(value) == len(ids) else value for key, value in sample.items()
    }

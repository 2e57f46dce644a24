"""Batches of random tokens and pixels shaped like a preset's training data, for `sts bench`.

Lengths are either fixed (every sample: one image and the stage's mean text length) or sampled
from a distribution shaped like LLaVA-665K's: 6.1% of instruction samples are text-only (its
40,688 ShareGPT conversations of 665,298), the rest have one image; text lengths are log-normal,
three and a half times longer (median) for the text-only ones, scaled to the stage's mean and
clipped to [mean/8, 8 x mean]. Alignment's captions (LCS-558K) all have an image and spread less.
The shares are the datasets'; the spreads are our assumption, not a measurement: the bench records
the lengths it drew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sts.cli.data.collate import Collator
from sts.cli.presets import image_geometry
from sts.cut import IGNORE_INDEX


@dataclass(frozen=True)
class LengthModel:
    text_only_share: float
    sigma_image: float  # of log text length, samples with an image
    sigma_text_only: float
    text_only_median_ratio: float  # a text-only sample's median text length over an image sample's

    def mean(self) -> float:
        """The mean of the unscaled draw (an image sample's median is 1)."""
        image = math.exp(self.sigma_image**2 / 2)
        text_only = self.text_only_median_ratio * math.exp(self.sigma_text_only**2 / 2)
        return (1 - self.text_only_share) * image + self.text_only_share * text_only


LLAVA_LENGTHS = {
    "align": LengthModel(0.0, 0.35, 0.35, 1.0),
    "instruct": LengthModel(40_688 / 665_298, 0.7, 0.8, 3.5),
}


@dataclass(frozen=True)
class Sample:
    text: int  # text tokens
    image: bool


def draw_samples(stage: str, mean_text: int, count: int, sampled: bool, generator: torch.Generator) -> list[Sample]:
    if not sampled:
        return [Sample(mean_text, True)] * count
    model = LLAVA_LENGTHS[stage]
    text_only = torch.rand(count, generator=generator) < model.text_only_share
    sigma = torch.where(text_only, model.sigma_text_only, model.sigma_image)
    median = torch.where(text_only, model.text_only_median_ratio, 1.0)
    raw = median * torch.exp(sigma * torch.randn(count, generator=generator))
    lengths = (raw * mean_text / model.mean()).round().clamp(max(mean_text // 8, 4), 8 * mean_text)
    return [Sample(int(n), not bool(t)) for n, t in zip(lengths, text_only)]


class ImageLayout:
    """How one image of `size` (height, width) enters a family's model: its placeholder tokens in the
    sequence, the images its vision tower encodes (anyres: the base view and the tiles), its pixels."""

    def __init__(self, config, size: tuple[int, int]):
        self.config, self.size = config, size
        self.kind = type(config).__name__
        self.geometry = image_geometry(config, size)

    @property
    def tokens(self) -> int:
        return self.geometry.tokens()

    @property
    def tower_images(self) -> int:
        return self.geometry.tower_images

    @property
    def image_token(self) -> int:
        return getattr(self.config, "image_token_index", None) or self.config.image_token_id

    def placeholder(self) -> list[int]:
        """The image's tokens in the sequence (Qwen-VL: between its vision start and end tokens)."""
        tokens = [self.image_token] * self.tokens
        if self.kind.startswith("Llava"):
            return tokens
        return [self.config.vision_start_token_id, *tokens, self.config.vision_end_token_id]

    def pixels(self, images: int, generator: torch.Generator) -> dict:
        vision = self.config.vision_config
        if self.kind == "LlavaConfig":
            return {"pixel_values": torch.randn(images, 3, *self.size, generator=generator)}
        if self.kind == "LlavaNextConfig":
            tile = vision.image_size
            return {
                "pixel_values": torch.randn(images, self.tower_images, 3, tile, tile, generator=generator),
                "image_sizes": torch.tensor([self.size] * images),
            }
        grid = (1, self.size[0] // vision.patch_size, self.size[1] // vision.patch_size)  # (time, height, width)
        patch_values = 3 * vision.temporal_patch_size * vision.patch_size**2
        return {
            "pixel_values": torch.randn(images * grid[1] * grid[2], patch_values, generator=generator),
            "image_grid_thw": torch.tensor([grid] * images),
        }


def special_ids(config) -> set[int]:
    names = ("image_token_index", "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return {getattr(config, name) for name in names if getattr(config, name, None) is not None}


def synthetic_batch(layout: ImageLayout, samples: list[Sample], generator: torch.Generator) -> dict:
    """Right-padded model inputs: per sample, a first text token, its image's placeholder, the rest of
    its text, the last quarter of the text as the answer (labelled)."""
    vocab = layout.config.get_text_config().vocab_size
    specials = special_ids(layout.config)
    encoded = []
    for sample in samples:
        text = torch.randint(10, min(vocab, 30000), (sample.text,), generator=generator).tolist()
        text = [10 if token in specials else token for token in text]
        ids = torch.tensor(text[:1] + (layout.placeholder() if sample.image else []) + text[1:])
        labels, answer = torch.full_like(ids, IGNORE_INDEX), max(sample.text // 4, 1)
        labels[-answer:] = ids[-answer:]
        encoded.append({"input_ids": ids, "labels": labels})
    batch = Collator(pad_token_id=0)(encoded)
    images = sum(sample.image for sample in samples)
    return {**batch, **(layout.pixels(images, generator) if images else {})}


def visual_tokens(layout: ImageLayout, samples: list[Sample]) -> list[int]:
    """Each sample's visual tokens (what a compressor may cut)."""
    return [layout.tokens if sample.image else 0 for sample in samples]


def real_lengths(layout: ImageLayout, samples: list[Sample]) -> list[int]:
    """Each sample's tokens in the language model, padding excluded."""
    return [sample.text + (len(layout.placeholder()) if sample.image else 0) for sample in samples]

"""Visual Token Compressor: which of an image's projected tokens the language model sees.

Every strategy is one function with the same signature, registered in STRATEGIES:

    strategy(features [n, d], grid (rows, cols), keep: int, context) -> (kept [k, d], sources [k])

`sources` are the indices (into the image's n tokens, ascending) whose positions the kept
tokens take; selection strategies return a subset of `features`, `pool` averages windows.
`compress` adds how many image tokens each kept token stands for (for proportional attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Context:
    """What a strategy may look at besides the image's own tokens."""

    instruction: torch.Tensor | None  # [t, d] embeddings of the user's text (never answers); None if absent
    generator: torch.Generator


def evenly_spaced(count: int, total: int) -> torch.Tensor:
    """`count` centred, evenly spaced indices in range(total)."""
    return ((torch.arange(count) + 0.5) * total / count).floor().long()


def uniform(features, grid, keep, context):
    rows, cols = grid
    side = math.isqrt(keep)
    if side * side == keep and side <= min(rows, cols):
        # A regular sub-grid: keeps coverage of the whole image in both directions.
        r, c = evenly_spaced(side, rows), evenly_spaced(side, cols)
        sources = (r[:, None] * cols + c[None, :]).flatten()
    else:
        sources = evenly_spaced(keep, rows * cols)
    return features[sources], sources


def random(features, grid, keep, context):
    sources = torch.randperm(len(features), generator=context.generator)[:keep].sort().values
    return features[sources.to(features.device)], sources


def text_guided(features, grid, keep, context):
    """Keep the tokens most similar (cosine, best match over the instruction's tokens)
    to the instruction text; needs no attention maps, so it works with SDPA/FlashAttention."""
    if context.instruction is None or len(context.instruction) == 0:
        return uniform(features, grid, keep, context)
    similarity = F.normalize(features.detach().float(), dim=-1) @ F.normalize(context.instruction.detach().float(), dim=-1).T
    scores = similarity.max(dim=-1).values
    sources = scores.topk(keep).indices.sort().values.cpu()
    return features[sources.to(features.device)], sources


def distinct(features, grid, keep, context):
    """Keep the tokens least like the image's mean token. Large uniform regions (background,
    sky, walls) give many near-identical tokens that say little; the distinct ones carry the
    content. Needs no text and no attention maps."""
    unit = F.normalize(features.detach().float(), dim=-1)
    typicality = unit @ F.normalize(unit.mean(0), dim=0)
    sources = typicality.topk(keep, largest=False).indices.sort().values.cpu()
    return features[sources.to(features.device)], sources


def pool_window(grid, keep) -> int:
    rows, cols = grid
    return max(1, round(math.sqrt(rows * cols / keep)))


def pool(features, grid, keep, context):
    """Average k x k windows, k chosen so about `keep` tokens remain; every pixel stays covered."""
    rows, cols = grid
    k = pool_window(grid, keep)
    image = features.T.reshape(1, -1, rows, cols)
    pooled = F.avg_pool2d(image, k, ceil_mode=True).flatten(2)[0].T
    out_rows, out_cols = math.ceil(rows / k), math.ceil(cols / k)
    r, c = torch.arange(out_rows) * k, torch.arange(out_cols) * k
    sources = (r[:, None] * cols + c[None, :]).flatten()  # each window takes its top-left position
    return pooled, sources


STRATEGIES = {"uniform": uniform, "random": random, "text_guided": text_guided, "distinct": distinct,
              "pool": pool}


def kept_count(total: int, keep_ratio: float) -> int:
    return max(1, min(total, round(total * keep_ratio)))


def stood_for(strategy: str, grid: tuple[int, int], keep: int, sources: torch.Tensor) -> torch.Tensor:
    """How many of the image's tokens each compressed token stands for: one for a selection,
    its window's size for a pooled token."""
    if strategy != "pool":
        return torch.ones(len(sources))
    rows, cols = grid
    k = pool_window(grid, keep)
    height = (rows - sources // cols).clamp(max=k)
    width = (cols - sources % cols).clamp(max=k)
    return (height * width).float()


def compress(strategy: str, features: torch.Tensor, grid: tuple[int, int], keep_ratio: float, context: Context):
    """(kept tokens, their source slots, how many image tokens each stands for)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown vtc.strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    if keep_ratio >= 1.0:
        return features, torch.arange(len(features)), torch.ones(len(features))
    keep = kept_count(len(features), keep_ratio)
    kept, sources = STRATEGIES[strategy](features, grid, keep, context)
    return kept, sources, stood_for(strategy, grid, keep, sources)

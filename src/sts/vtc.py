"""Visual Token Compressor: which of an image's projected tokens the language model sees.

Every strategy is one function with the same signature, registered in STRATEGIES:

    strategy(features [n, d], grid (rows, cols), keep: int, context) -> groups [n]

`groups[i]` is the kept token that image token `i` goes into (0 .. k-1, numbered in the order of
their first token), or -1 if it is dropped. A selection puts each kept token in a group of its
own; `pool` puts a window's tokens in one group, which the language model sees as their mean.
A kept token takes the position of its group's first token, and stands for as many image
tokens as its group holds (for proportional attention). One form serves both, so the cut of
the sequence (`sts.cut`) applies any strategy alike to every tensor that travels with the
visual tokens.
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


def selected(sources: torch.Tensor, n: int) -> torch.Tensor:
    """Groups of a selection: each of the (ascending) `sources` alone, everything else dropped."""
    groups = torch.full((n,), -1, dtype=torch.long)
    groups[sources.cpu()] = torch.arange(len(sources))
    return groups


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
    return selected(sources, len(features))


def random(features, grid, keep, context):
    sources = torch.randperm(len(features), generator=context.generator)[:keep].sort().values
    return selected(sources, len(features))


def text_guided(features, grid, keep, context):
    """Keep the tokens most similar (cosine, best match over the instruction's tokens)
    to the instruction text; needs no attention maps, so it works with SDPA/FlashAttention."""
    if context.instruction is None or len(context.instruction) == 0:
        return uniform(features, grid, keep, context)
    similarity = (
        F.normalize(features.detach().float(), dim=-1) @ F.normalize(context.instruction.detach().float(), dim=-1).T
    )
    scores = similarity.max(dim=-1).values
    return selected(scores.topk(keep).indices.sort().values, len(features))


def distinct(features, grid, keep, context):
    """Keep the tokens least like the image's mean token. Large uniform regions (background,
    sky, walls) give many near-identical tokens that say little; the distinct ones carry the
    content. Needs no text and no attention maps."""
    unit = F.normalize(features.detach().float(), dim=-1)
    typicality = unit @ F.normalize(unit.mean(0), dim=0)
    return selected(typicality.topk(keep, largest=False).indices.sort().values, len(features))


def pool(features, grid, keep, context):
    """Average k x k windows, k chosen so about `keep` tokens remain; every token stays covered
    (windows at the right and bottom edges may be smaller)."""
    rows, cols = grid
    k = max(1, round(math.sqrt(rows * cols / keep)))
    window_cols = math.ceil(cols / k)
    r, c = torch.arange(rows)[:, None] // k, torch.arange(cols)[None, :] // k
    return (r * window_cols + c).flatten()  # windows in row-major order: numbered by their first token


STRATEGIES = {"uniform": uniform, "random": random, "text_guided": text_guided, "distinct": distinct, "pool": pool}
FEATURE_STRATEGIES = {"text_guided", "distinct"}  # read the features; the others only their count and grid
TEXT_STRATEGIES = {"text_guided"}  # read the instruction
GRID_STRATEGIES = {"uniform", "pool"}  # read nothing but the grid: the same groups for every image of it


def kept_count(total: int, keep_ratio: float) -> int:
    return max(1, min(total, round(total * keep_ratio)))


def compress(
    strategy: str, features: torch.Tensor, grid: tuple[int, int], keep_ratio: float, context: Context
) -> torch.Tensor:
    """The groups [n] of one image's tokens (see the module's docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown vtc.strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    if keep_ratio >= 1.0:
        return torch.arange(len(features))
    return STRATEGIES[strategy](features, grid, kept_count(len(features), keep_ratio), context)


def kept_tokens(strategy: str, grid: tuple[int, int], keep_ratio: float) -> int:
    """How many tokens a grid keeps (a count that does not depend on the image's content)."""
    rows, cols = grid
    blank = torch.zeros(rows * cols, 1)
    return int(compress(strategy, blank, grid, keep_ratio, Context(None, torch.Generator().manual_seed(0))).max()) + 1

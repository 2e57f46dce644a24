"""Seeded draws: every random choice STS makes is a pure function of integer parts.

The parts are (seed, optimizer step, micro-batch, and the layer or visual unit drawn for), so
every rank of a distributed run, a gradient-checkpointing recompute and a resumed run make the
same choices without talking to each other. The skipper draws a coin per layer, the compressor
a generator per image (or video group) and a coin per step for full-token steps.
"""

from __future__ import annotations

import torch


def seed_of(*parts: int) -> int:
    """A 63-bit seed that is a pure function of its integer parts (splitmix-style mixing)."""
    seed = 0x9E3779B97F4A7C15
    for part in parts:
        seed = ((seed ^ (part + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) % (1 << 63)
    return seed


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by its integer parts."""
    return torch.Generator().manual_seed(seed_of(*parts))


def seeded_coin(*parts: int) -> float:
    """A uniform draw in [0, 1) that is a pure function of its integer parts."""
    return torch.rand(1, generator=seeded_generator(*parts)).item()

"""Layer Dynamic Skipper: which decoder layers a training step leaves out.

    p_l(e) = alpha * ((E - e) / E)^2 * (1 + epsilon * (2l - (L - 1)) / (L - 1)),  clipped to [0, 1]

`e / E` is training progress, `l` the 0-based layer of `L`. Skipping fades to zero by the
end of training; deeper layers are skipped more when epsilon > 0. Whether layer `l` is
skipped is a pure function of (seed, optimizer step, micro-batch, layer), so every rank of
a distributed run, and a gradient-checkpointing recompute, agrees (`sts.draws`).
"""

from __future__ import annotations

from sts.config import LDSConfig
from sts.draws import seeded_coin


def skip_probability(layer: int, layers: int, progress: float, cfg: LDSConfig) -> float:
    if layer < cfg.protect_first or layer >= layers - cfg.protect_last:
        return 0.0
    decay = (1.0 - min(max(progress, 0.0), 1.0)) ** 2
    tilt = 1.0 + cfg.epsilon * (2 * layer - (layers - 1)) / (layers - 1) if layers > 1 else 1.0
    return min(max(cfg.alpha * decay * tilt, 0.0), 1.0)


def can_skip(layers: int, cfg: LDSConfig | None) -> bool:
    """Whether any layer may ever be skipped (some layer is unprotected and alpha > 0)."""
    return cfg is not None and any(skip_probability(layer, layers, 0.0, cfg) > 0 for layer in range(layers))


def draw_skips(layers: int, progress: float, step: int, micro_batch: int, cfg: LDSConfig, seed: int) -> list[int]:
    """The layers skipped at this (step, micro-batch): each with its own seeded coin."""
    skipped = []
    for layer in range(layers):
        p = skip_probability(layer, layers, progress, cfg)
        if p > 0 and seeded_coin(seed, step, micro_batch, layer) < p:
            skipped.append(layer)
    return skipped


def expected_skips(layers: int, cfg: LDSConfig, points: int = 1000) -> float:
    """Layers skipped per step on average over a whole run (progress 0 -> 1), clipping included."""
    grid = [(i + 0.5) / points for i in range(points)]
    return sum(skip_probability(layer, layers, e, cfg) for e in grid for layer in range(layers)) / points

"""The method's knobs: what `apply_sts` attaches (the compressor's keep-ratio schedule included).

A wrong key or value is a pydantic error naming it; the runner's recipes (`sts.cli.recipes`)
embed these blocks per stage.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    """Unknown keys are errors, and so are infinite or NaN numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class VTCConfig(Strict):
    """Visual Token Compressor: keep `keep_ratio` of each image's tokens in training."""

    strategy: Literal["uniform", "random", "text_guided", "distinct", "pool"] = "uniform"
    keep_ratio: float = Field(default=0.25, gt=0, le=1)
    keep_ratio_schedule: list[tuple[float, float]] = Field(
        default=[],
        description="[[progress, keep_ratio], ...]: from each point of the stage's progress (0-1, "
        "ascending) on, keep that ratio instead; before the first point, `keep_ratio` (coarse to fine: "
        "keep_ratio 0.0625 with [[0.5, 0.25]] trains the first half on a sixteenth of the tokens)",
    )
    tile_keep_ratio: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="anyres images (LLaVA-NeXT, OneVision): the ratio the tiles keep, which show at a finer "
        "scale what the base view shows whole; None: the tiles keep what the base view keeps (keep_ratio and "
        "its schedule). 0.0625 with keep_ratio 0.25 pools the 2 x 2 tiles to the base view's pooled grid",
    )
    merge_newlines: bool = Field(
        default=False,
        description="anyres tiles: the newlines closing rows whose kept tokens went into one row of kept tokens "
        "(rows pooled together) become one newline, standing for them, after that row; so 4 x 4 windows of a "
        "16-row tile grid keep 4 newlines, not 16, as the grid would have at a quarter of the resolution. False: "
        "every newline is kept",
    )
    deep_cuts: list[tuple[float, float]] = Field(
        default=[],
        description="[[depth, keep_ratio], ...]: inside the language model, from the layer at each depth (a "
        "share of its layers, ascending in (0, 1)) on, every image keeps only keep_ratio (descending) of the "
        "visual tokens it had when the language model received it (sts.deep; PyramidDrop's progressive "
        "dropping). [[0.5, 0.5]]: the second half of the layers reads half of each image's tokens",
    )
    deep_strategy: Literal["uniform", "text_guided"] = Field(
        default="uniform",
        description="which tokens a deep cut keeps: evenly spaced, or those most like the last prompt token there",
    )
    reindex_positions: bool = Field(default=False, description="False: kept tokens keep their original position ids")
    stages: list[str] = Field(default=["align"], description="recipe stages it is active in")
    full_tokens_final_fraction: float = Field(
        default=0.0, ge=0, lt=1, description="last fraction of a stage's steps on full tokens"
    )
    full_tokens_random_fraction: float = Field(
        default=0.0, ge=0, lt=1, description="fraction of the other steps, drawn at random, on full tokens"
    )
    self_distillation: float = Field(
        default=0.0,
        ge=0,
        description="on full-token steps, the weight of a distillation term: the compressed forward runs "
        "first, without gradient, and the full-token forward also learns its predictions of the answer tokens "
        "(KL divergence, per answer token, as the loss counts them): DualSpeed's slow mode learning from its fast "
        "mode. It needs full-token steps (DualSpeed: full_tokens_random_fraction 0.1, self_distillation 1.0)",
    )
    proportional_attention: bool = Field(
        default=False,
        description="in the language model's attention, a token counts as many image tokens as it "
        "stands for (a pooled token as its window), so attention's shares of image and text stay as with full "
        "tokens: a log(size) key bias, a 4D float mask for eager attention, one more head dimension for any "
        "other kernel (sts.attention)",
    )

    @field_validator("keep_ratio_schedule")
    @classmethod
    def ascending_points(cls, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        starts = [start for start, _ in points]
        if starts != sorted(starts) or not all(0 <= s < 1 for s in starts) or not all(0 < r <= 1 for _, r in points):
            raise ValueError(
                "needs [progress, keep_ratio] points with ascending progress in [0, 1) and ratios in (0, 1]"
            )
        return points

    @field_validator("deep_cuts")
    @classmethod
    def deeper_and_fewer(cls, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        depths, ratios = [d for d, _ in points], [r for _, r in points]
        if (
            depths != sorted(set(depths))
            or ratios != sorted(ratios, reverse=True)
            or not all(0 < d < 1 for d in depths)
            or not all(0 < r <= 1 for r in ratios)
        ):
            raise ValueError(
                "needs [depth, keep_ratio] points with ascending depths in (0, 1) and descending ratios in (0, 1]"
            )
        return points

    @model_validator(mode="after")
    def distils_on_full_token_steps(self) -> VTCConfig:
        if self.self_distillation and not (self.full_tokens_random_fraction or self.full_tokens_final_fraction):
            raise ValueError(
                "self_distillation needs full-token steps to distil into: set full_tokens_random_fraction "
                "(or full_tokens_final_fraction)"
            )
        return self

    def keep_ratio_at(self, progress: float) -> float:
        ratio = self.keep_ratio
        for start, scheduled in self.keep_ratio_schedule:
            if progress >= start:
                ratio = scheduled
        return ratio

    def phases(self) -> list[tuple[float, float]]:
        """(share of the stage's steps, keep ratio) of each phase of the schedule."""
        bounds = [0.0, *(start for start, _ in self.keep_ratio_schedule), 1.0]
        ratios = [self.keep_ratio, *(ratio for _, ratio in self.keep_ratio_schedule)]
        return [(end - start, ratio) for start, end, ratio in zip(bounds, bounds[1:], ratios) if end > start]


class LDSConfig(Strict):
    """Layer Dynamic Skipper: skip decoder layer l with probability p_l(e) in training."""

    alpha: float = Field(default=0.5, ge=0, le=1, description="peak skip rate, at the start of training")
    epsilon: float = Field(default=0.5, ge=-1, le=1, description="depth tilt: > 0 skips deeper layers more")
    protect_first: int = Field(default=1, ge=0, description="the first layers are never skipped")
    protect_last: int = Field(default=1, ge=0, description="the last layers are never skipped")
    stages: list[str] = Field(default=["instruct"], description="recipe stages it is active in")


class STSConfig(Strict):
    """What `apply_sts` attaches. Outside a recipe, exactly the blocks given are enabled."""

    vtc: VTCConfig | None = None
    lds: LDSConfig | None = None
    pack: bool = Field(
        default=False,
        description="hand the language model the batch's samples as one padding-free row after the cut "
        "(varlen kernels get their cumulative lengths, others a block-diagonal mask)",
    )
    seed: int = 0

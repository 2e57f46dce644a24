"""Analytic FLOPs of one training step of a LLaVA-style model, with and without STS.

Counted as `torch.utils.flop_counter` counts: matrix products, convolutions and attention
(2 FLOPs a multiply-add), nothing elementwise. Backward costs one product for the input
gradient (needed when anything before it trains) and one for the weight gradient (needed
when the part itself trains); a frozen part with nothing trainable before it has no backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from sts.cli.recipes import RecipeConfig
from sts.cut import grid_plan
from sts.deep import cut_layers
from sts.lds import expected_skips
from sts.vtc import kept_tokens


@dataclass(frozen=True)
class Shapes:
    """The widths that decide a step's cost."""

    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    patch_size: int
    image_tokens: int  # patches per image, before the CLS token
    projector_in: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_kv_hidden: int
    vocab: int

    @classmethod
    def of(cls, config) -> Shapes:
        """From a transformers multimodal config. The language model's widths are read from any
        family's text config; the vision side only from fixed-resolution towers (CLIP, SigLIP:
        `image_size`), as a dynamic-resolution tower's cost depends on each image's size: there
        (Qwen-VL) only the language model's FLOPs are counted, which is the part STS changes."""
        vision, text = config.vision_config, config.get_text_config()
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        fixed = getattr(vision, "image_size", None) is not None
        return cls(
            vision_hidden=vision.hidden_size if fixed else 0,
            vision_intermediate=vision.intermediate_size if fixed else 0,
            vision_layers=vision.num_hidden_layers if fixed else 0,
            patch_size=vision.patch_size,
            image_tokens=(vision.image_size // vision.patch_size) ** 2 if fixed else 0,
            projector_in=vision.hidden_size if fixed else 0,
            text_hidden=text.hidden_size,
            text_intermediate=text.intermediate_size,
            text_layers=text.num_hidden_layers,
            text_kv_hidden=head_dim * kv_heads,
            vocab=text.vocab_size,
        )


def linear(tokens: float, inputs: int, outputs: int) -> float:
    return 2.0 * tokens * inputs * outputs


def step_cost(forward: float, input_grad: bool, weight_grad: bool) -> float:
    """A weight product's forward plus the backward products needed."""
    return forward * (1 + input_grad + weight_grad)


def attention_cost(forward: float, needs_grad: bool) -> float:
    """Attention's two products have no weights; backward needs the gradient of both operands."""
    return forward * (1 + 2 * needs_grad)


def vision_flops(s: Shapes, images: int, trains: bool) -> float:
    tokens = s.image_tokens + 1  # CLS
    weights = s.vision_layers * (
        linear(tokens, s.vision_hidden, 4 * s.vision_hidden)
        + linear(tokens, s.vision_hidden, 2 * s.vision_intermediate)
    )
    patch_embedding = linear(s.image_tokens, 3 * s.patch_size**2, s.vision_hidden)  # pixels need no gradient
    attention = s.vision_layers * 4.0 * tokens * tokens * s.vision_hidden
    return images * (
        step_cost(weights, trains, trains)
        + step_cost(patch_embedding, False, trains)
        + attention_cost(attention, trains)
    )


def language_layer_flops(s: Shapes, batch: int, length: int) -> tuple[float, float]:
    """(weight products, attention products) of one decoder layer over a padded batch."""
    tokens = batch * length
    weights = linear(tokens, s.text_hidden, 2 * s.text_hidden + 2 * s.text_kv_hidden) + linear(
        tokens, s.text_hidden, 3 * s.text_intermediate
    )
    attention = 4.0 * batch * length * length * s.text_hidden
    return weights, attention


def train_step_flops(
    s: Shapes,
    batch: int,
    length: int,
    images: int,
    trains: dict[str, bool],
    layers_run: float | None = None,
    deep: tuple[tuple[float, int], ...] = (),
) -> dict[str, float]:
    """FLOPs of one forward+backward over `batch` sequences padded to `length` tokens.

    trains: part -> trainable (vision_tower, projector, language_model).
    layers_run: decoder layers executed (fewer under LDS); all by default.
    deep: (layers, length) after each deep cut (`vtc.deep_cuts`): that many of the layers run read
    only `length` tokens, and the head reads the last cut's.
    """
    layers_run = s.text_layers if layers_run is None else layers_run
    vision_trains, projector_trains, lm_trains = (trains[p] for p in ("vision_tower", "projector", "language_model"))
    lm_input_grad = vision_trains or projector_trains

    def lm_layer(tokens: int) -> float:
        weights, attention = language_layer_flops(s, batch, tokens)
        return step_cost(weights, lm_input_grad, lm_trains) + attention_cost(attention, lm_input_grad or lm_trains)

    shallow = layers_run - sum(layers for layers, _ in deep)
    final = deep[-1][1] if deep else length
    # The head's input gradient is always needed while anything trains.
    lm_head = step_cost(linear(batch * final, s.text_hidden, s.vocab), any(trains.values()), lm_trains)
    projector_forward = linear(images * s.image_tokens, s.projector_in, s.text_hidden) + linear(
        images * s.image_tokens, s.text_hidden, s.text_hidden
    )
    return {
        "vision_tower": vision_flops(s, images, vision_trains),
        "projector": step_cost(projector_forward, vision_trains, projector_trains),
        "language_model": shallow * lm_layer(length) + sum(layers * lm_layer(n) for layers, n in deep) + lm_head,
    }


def deep_segments(num_layers: int, skipped: list[int], cuts: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """A forward's deep cuts, (layer, length from it on), as `train_step_flops`' `deep`: the layers
    run from each cut to the next, and their length."""
    ends = [layer for layer, _ in cuts[1:]] + [num_layers]
    return tuple(
        (sum(1 for layer in range(start, end) if layer not in skipped), length)
        for (start, length), end in zip(cuts, ends)
    )


def sample_deep_segments(
    points: list[tuple[float, float]], num_layers: int, skipped: list[int], text: int, visual: int
) -> tuple[tuple[int, int], ...]:
    """One sample's deep cuts (`vtc.deep_cuts` points) as `train_step_flops`' `deep`: its `text`
    tokens and its image's `visual` ones at the language model, the image cut to each point's ratio
    as `sts.deep` cuts it (a text-only sample keeps its length)."""
    cuts = [
        (layer, text + (max(1, round(visual * ratio)) if visual else 0))
        for layer, ratio in cut_layers(points, num_layers)
    ]
    return deep_segments(num_layers, skipped, cuts)


def samples_step_flops(
    s: Shapes,
    lengths: list[int],
    images: int,
    trains: dict[str, bool],
    layers_run: float | None = None,
    deep: list[tuple[tuple[float, int], ...]] | None = None,
) -> dict[str, float]:
    """FLOPs of one step over samples of `lengths` real tokens each, `images` encoded by the vision
    tower: what packed samples cost, and the useful work of a padded batch (padding is no work).
    deep: each sample's deep cuts (`train_step_flops`' `deep`)."""
    parts = train_step_flops(s, 0, 0, images, trains, layers_run)
    deep = deep or [()] * len(lengths)
    parts["language_model"] = sum(
        train_step_flops(s, 1, n, 0, trains, layers_run, cuts)["language_model"] for n, cuts in zip(lengths, deep)
    )
    return parts


@dataclass(frozen=True)
class ImageGeometry:
    """One image as the language model and the compressor see it: the grids of its units (a fixed
    tower's one grid; anyres: the base view, and the tiles' grid, a finer view of the same image,
    each of whose rows ends in a newline that no compressor takes), and the images the vision tower
    encodes for it."""

    grids: tuple[tuple[int, int], ...]
    tower_images: int = 1
    tiles: tuple[tuple[int, int], ...] = ()

    def tokens(self) -> int:
        return sum(rows * cols for rows, cols in self.grids) + sum(rows * (cols + 1) for rows, cols in self.tiles)

    def kept(
        self, strategy: str, keep_ratio: float, tile_keep_ratio: float | None = None, merge_newlines: bool = False
    ) -> int:
        tile_ratio = keep_ratio if tile_keep_ratio is None else tile_keep_ratio

        def newlines(grid: tuple[int, int]) -> int:
            return grid_plan(strategy, grid, tile_ratio).band_starts(grid[1]).numel() if merge_newlines else grid[0]

        return sum(kept_tokens(strategy, grid, keep_ratio) for grid in self.grids) + sum(
            kept_tokens(strategy, grid, tile_ratio) + newlines(grid) for grid in self.tiles
        )


def recipe_flops(
    recipe: RecipeConfig,
    config,
    data: dict[str, tuple[int, float]],
    fractions: list[float],
    geometry: ImageGeometry | None = None,
) -> list[float]:
    """Each stage's analytic FLOPs for a model `config` with one image per sample (`geometry`; by
    default the fixed tower's one grid) and `data[stage] = (samples, text tokens per sample)`,
    under the recipe's STS settings (the skipper's expected skips over the run, the share of
    full-token steps) and each stage's samples times `fractions` (the share of the dense recipe's
    steps it ran: the equal-time baseline runs fewer)."""
    shapes, side = Shapes.of(config), config.vision_config.image_size // config.vision_config.patch_size
    geometry = geometry or ImageGeometry(((side, side),))
    flops = []
    for stage, fraction in zip(recipe.stages, fractions):
        samples, text = data[stage.name]
        sts = recipe.sts_for(stage)
        trains = {part: mode == "full" for part, mode in stage.train.model_dump().items()}
        layers = shapes.text_layers - (expected_skips(shapes.text_layers, sts.lds) if sts.lds else 0)

        def per_sample(visual: int, deep_cuts: list[tuple[float, float]] = (), teacher: bool = False) -> float:
            """One sample's cost with `visual` tokens at the language model, cut further in it by `deep_cuts`;
            a self-distillation `teacher` forward runs every layer and no backward."""
            step_trains = dict.fromkeys(trains, False) if teacher else trains
            layers_run = shapes.text_layers if teacher else layers
            share_run = layers_run / shapes.text_layers  # the skipper's expected share of each segment's layers
            segments = sample_deep_segments(deep_cuts, shapes.text_layers, [], text, visual)
            deep = tuple((count * share_run, n) for count, n in segments)
            return sum(
                train_step_flops(
                    shapes, 1, text + visual, geometry.tower_images, step_trains, layers_run, deep
                ).values()
            )

        def compressed(teacher: bool = False) -> float:
            vtc = sts.vtc
            return sum(
                share
                * per_sample(
                    geometry.kept(vtc.strategy, ratio, vtc.tile_keep_ratio, vtc.merge_newlines), vtc.deep_cuts, teacher
                )
                for share, ratio in vtc.phases()
            )

        cost = per_sample(geometry.tokens())
        if sts.vtc:
            full = (
                sts.vtc.full_tokens_final_fraction
                + (1 - sts.vtc.full_tokens_final_fraction) * sts.vtc.full_tokens_random_fraction
            )
            teacher = compressed(teacher=True) if sts.vtc.self_distillation else 0.0
            cost = full * (cost + teacher) + (1 - full) * compressed()
        flops.append(samples * fraction * cost)
    return flops

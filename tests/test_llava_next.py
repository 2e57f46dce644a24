"""LLaVA-NeXT / OneVision specifics: anyres units (base grid, tile grid, row-end newlines),
newlines never compressed, grid strategies on the 2-D tile layout, OneVision's other layouts."""

import math

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from sts.cli.models.families import save_tiny
from sts.vtc import STRATEGIES, kept_count
from tests.test_families import language_model_inputs, units_per_row

PROMPT = "USER : <image> What color is the circle ? ASSISTANT : red"
SIZES = {"wide": (80, 48), "tall": (48, 96), "square": (64, 64)}  # width x height


def tiny(name, folder):
    folder = save_tiny(name, folder)
    return AutoModelForImageTextToText.from_pretrained(folder).train(), AutoProcessor.from_pretrained(folder)


def pictures() -> list:
    generator = torch.Generator().manual_seed(0)
    return [
        Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
        for w, h in SIZES.values()
    ]


def one_image_per_sample(processor) -> dict:
    images = pictures()
    return dict(
        processor(text=[PROMPT] * len(images), images=[[image] for image in images], padding=True, return_tensors="pt")
    )


@pytest.fixture(scope="module", params=["LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"])
def family(request, tmp_path_factory):
    model, processor = tiny(request.param, tmp_path_factory.mktemp(request.param))
    return model, one_image_per_sample(processor)


def side_of(model) -> int:
    vision = model.config.vision_config
    return vision.image_size // vision.patch_size


def tile_grid(model, image_size) -> tuple[int, int]:
    """(rows, cols) of an image's unpadded tile grid, from its size by transformers' own helpers."""
    side, tile = side_of(model), model.config.vision_config.image_size
    tiles_high, tiles_wide = get_anyres_image_grid_shape(image_size, model.config.image_grid_pinpoints, tile)
    return tuple(unpad_image(torch.zeros(1, tiles_high * side, tiles_wide * side), image_size).shape[1:])


def tile_start(model, batch, row: int) -> int:
    """Sequence position of the first tile token of the (one) image of `row`: after its base grid."""
    image = (batch["input_ids"][row] == model.config.image_token_id).nonzero()
    return int(image[0]) + side_of(model) ** 2


def test_units_are_the_base_grid_then_the_tile_grid_with_row_end_newlines(family):
    model, batch = family
    side, newline = side_of(model), model.model.image_newline
    full = language_model_inputs(model, batch)
    shapes = []
    for row, (base, tiles) in enumerate(units_per_row(model, batch)):
        rows, cols = tile_grid(model, batch["image_sizes"][row])
        assert (base.size, base.grid, base.candidates) == (side * side, (side, side), None)
        assert (tiles.size, tiles.grid) == (rows * (cols + 1), (rows, cols))
        layout = torch.arange(tiles.size).view(rows, cols + 1)
        assert torch.equal(tiles.candidates, layout[:, :-1].flatten()), "every tile token but the row ends"
        start = tile_start(model, batch, row)
        row_ends = full["inputs_embeds"][row, start + layout[:, -1]]
        assert torch.equal(row_ends, newline.expand(rows, -1)), "the row ends are the newlines"
        assert int((batch["input_ids"][row] == model.config.image_token_id).sum()) == base.size + tiles.size
        shapes.append((rows, cols))
    wide, tall, square = shapes
    assert wide[1] > wide[0] and tall[0] > tall[1] and square[0] == square[1]


def received(inputs, row: int, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The original positions and the embeddings of the tokens the language model receives in `row`."""
    ids = inputs["position_ids"]
    ids = torch.arange(inputs["inputs_embeds"].shape[1]) if ids is None else ids[row]
    return ids[mask[row].bool()], inputs["inputs_embeds"][row][mask[row].bool()]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_newline_survives_compression(family, strategy):
    model, batch = family
    newline = model.model.image_newline
    full = language_model_inputs(model, batch)
    cut = language_model_inputs(model, batch, {"vtc": {"strategy": strategy, "keep_ratio": 0.25}})
    assert cut["inputs_embeds"].shape[1] < full["inputs_embeds"].shape[1]
    for row, image_size in enumerate(batch["image_sizes"]):
        old_positions, old_embeds = received(full, row, batch["attention_mask"])
        new_positions, new_embeds = received(cut, row, cut["attention_mask"])
        old_newlines = old_positions[(old_embeds == newline).all(-1)]
        assert len(old_newlines) == tile_grid(model, image_size)[0]
        assert torch.equal(new_positions[(new_embeds == newline).all(-1)], old_newlines)


@pytest.mark.parametrize("strategy", ["pool", "uniform", "random"])
def test_merged_newlines_close_each_row_of_kept_tile_tokens(family, strategy):
    """With `merge_newlines`, the tiles read as a smaller grid: one newline after each row of kept tokens
    (the row end of the last original row before the next one), where every newline is otherwise kept."""
    model, batch = family
    newline = model.model.image_newline
    config = {"strategy": strategy, "keep_ratio": 0.25, "merge_newlines": True}
    cut = language_model_inputs(model, batch, {"vtc": config})
    fewer = 0
    for row, image_size in enumerate(batch["image_sizes"]):
        (rows, cols), start = tile_grid(model, image_size), tile_start(model, batch, row)
        positions, embeds = received(cut, row, cut["attention_mask"])
        in_tiles = (positions >= start) & (positions < start + rows * (cols + 1))
        grid_rows = ((positions[in_tiles] - start) // (cols + 1)).tolist()
        is_newline = (positions[in_tiles] - start) % (cols + 1) == cols
        assert torch.allclose(embeds[in_tiles][is_newline], newline.expand(int(is_newline.sum()), -1))
        is_newline = is_newline.tolist()
        assert is_newline[-1]
        bands, band = [], []
        for grid_row, closes in zip(grid_rows, is_newline):
            if closes:
                assert band and all(r <= grid_row for r in band), "a newline closes the rows of kept tokens before it"
                assert not bands or min(band) > bands[-1][1], "and no row of the next band"
                bands.append((band, grid_row))
                band = []
            else:
                band.append(grid_row)
        first_rows = [min(kept) for kept, _ in bands]
        assert [end for _, end in bands] == [r - 1 for r in first_rows[1:]] + [rows - 1]
        fewer += rows - len(bands)
    assert fewer > 0, "some rows' newlines were merged"


@pytest.mark.parametrize("strategy", ["uniform", "pool"])
def test_grid_strategies_keep_and_pool_on_the_2d_tile_grid(family, strategy):
    model, batch = family
    full = language_model_inputs(model, batch)
    cut = language_model_inputs(model, batch, {"vtc": {"strategy": strategy, "keep_ratio": 0.25}})
    for row, image_size in enumerate(batch["image_sizes"]):
        (rows, cols), start = tile_grid(model, image_size), tile_start(model, batch, row)
        positions, embeds = received(cut, row, cut["attention_mask"])
        in_tiles = (positions >= start) & (positions < start + rows * (cols + 1))
        index = positions[in_tiles] - start
        on_grid = index % (cols + 1) < cols  # the others are the newlines
        cells = [divmod(i, cols + 1) for i in index[on_grid].tolist()]
        if strategy == "uniform":
            keep = kept_count(rows * cols, 0.25)
            groups = STRATEGIES["uniform"](torch.zeros(rows * cols, 1), (rows, cols), keep, None)
            assert cells == [divmod(i, cols) for i in (groups >= 0).nonzero().flatten().tolist()]
            kept_rows, kept_cols = {a for a, _ in cells}, {b for _, b in cells}
            if rows == cols:  # a square number kept: a regular sub-grid, spread over both directions
                assert set(cells) == {(a, b) for a in kept_rows for b in kept_cols} and len(kept_rows) > 1
            continue
        assert cells == [(a, b) for a in range(0, rows, 2) for b in range(0, cols, 2)], "2 x 2 windows' corners"
        for (a, b), pooled in zip(cells, embeds[in_tiles][on_grid]):
            window = [
                start + i * (cols + 1) + j for i in range(a, min(a + 2, rows)) for j in range(b, min(b + 2, cols))
            ]
            assert torch.allclose(pooled, full["inputs_embeds"][row, window].mean(0), atol=1e-6)


def newlines_received(model, batch, strategy: str) -> list[int]:
    cut = language_model_inputs(model, batch, {"vtc": {"strategy": strategy, "keep_ratio": 0.25}})
    return (cut["inputs_embeds"] == model.model.image_newline).all(-1).sum(1).tolist()


def test_onevision_single_crops_and_shrunk_tile_grids(tmp_path):
    model, processor = tiny("LlavaOnevisionForConditionalGeneration", tmp_path)
    side, images = side_of(model), pictures()
    # Several images in one sample: each is seen as one crop, its base grid then one newline.
    batch = dict(
        processor(text=[PROMPT.replace("<image>", "<image> " * len(images))], images=[images], return_tensors="pt")
    )
    [units] = units_per_row(model, batch)
    assert [(u.size, u.grid, u.candidates.tolist()) for u in units] == [
        (side * side + 1, (side, side), list(range(side * side)))
    ] * len(images)
    assert newlines_received(model, batch, "pool") == [len(images)]
    # Over anyres_max_N tiles' worth of tokens the tile grid is shrunk before the newlines are added.
    model.config.vision_aspect_ratio = processor.vision_aspect_ratio = "anyres_max_1"
    batch = one_image_per_sample(processor)
    grids = [tiles.grid for _, tiles in units_per_row(model, batch)]
    shrunk = 0
    for (rows, cols), grid in zip((tile_grid(model, size) for size in batch["image_sizes"]), grids):
        ratio = math.sqrt(rows * cols) / side
        assert grid == ((int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols))
        shrunk += grid != (rows, cols)
    assert shrunk > 0
    assert newlines_received(model, batch, "uniform") == [rows for rows, _ in grids]

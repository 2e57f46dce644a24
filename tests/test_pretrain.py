from collections import Counter

import pytest
import torch

from sts.cli.models.tiny import FAMILIES
from sts.cli.pretrain import NUM_CONTENTS, patch_targets
from sts.cli.recipes import TinyModelConfig


def test_each_patch_is_labelled_with_its_grid_cell():
    scene = [
        {"colour": "red", "shape": "circle", "row": 0, "col": 3},
        {"colour": "cyan", "shape": "triangle", "row": 2, "col": 1},
    ]
    targets = patch_targets([scene], TinyModelConfig()).reshape(8, 8)
    red_circle, cyan_triangle = 1, 1 + 5 * 3 + 2
    assert (targets[0:2, 6:8] == red_circle).all()
    assert (targets[4:6, 2:4] == cyan_triangle).all()
    assert int((targets > 0).sum()) == 8, "each object covers the 2x2 patches of its cell"
    assert targets.max() < NUM_CONTENTS


def test_the_anyres_forms_patches_are_labelled_in_each_view_and_its_tokens_in_the_models_order():
    """Tower targets: the base view sees the whole image, each tile a quarter at twice the scale.
    Symbolic tokens: the model's own order, base view first, each tile row ended by a newline."""
    from sts.cli.models.tiny import build_model
    from sts.cli.pretrain import image_token_cells

    cfg = TinyModelConfig()
    scene = [{"colour": "red", "shape": "circle", "row": 0, "col": 3}]
    targets = patch_targets([scene], cfg, "llava-next").reshape(5, 8, 8)
    assert (targets[0, 0:2, 6:8] == 1).all() and int((targets[0] > 0).sum()) == 4, "base view: as the LLaVA form"
    assert (targets[2, 0:4, 4:8] == 1).all() and int((targets[2] > 0).sum()) == 16, "top-right tile, 4 x 4 patches"
    assert int((targets[[1, 3, 4]] > 0).sum()) == 0

    cells = image_token_cells(build_model(cfg, base=False, family="llava-next"), cfg)
    assert len(cells) == 8 * 8 + 16 * 17
    assert [i for i, cell in enumerate(cells) if cell is None] == [64 + 17 * r + 16 for r in range(16)]
    assert cells[:8] == [(0, 0), (0, 0), (0, 1), (0, 1), (0, 2), (0, 2), (0, 3), (0, 3)]
    assert cells[64:80] == [(0, c // 4) for c in range(16)], "the tiles' first row spans the whole image"
    assert Counter(cells[64:]) == {None: 16, **{(r, c): 16 for r in range(4) for c in range(4)}}


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_base_weights_keep_pretraining_state_out_of_the_model(family):
    from safetensors.torch import load_file

    from sts.cli.models.tiny import BASE_WEIGHTS, EXTRA_PREFIX, build_model
    from sts.compat import in_model_layout

    stored = load_file(str(BASE_WEIGHTS[family]))
    model = build_model(base=False, family=family)
    assert {k for k in in_model_layout(stored, model) if not k.startswith(EXTRA_PREFIX)} <= set(model.state_dict())
    assert all(torch.isfinite(v).all() for v in stored.values())


def shipped_scorer(family: str):
    """The shipped base of `family` reading symbolic scenes, its processor, and its images' size."""
    from sts.cli.models.tiny import BASE_WEIGHTS, build_model, build_processor, load_extra
    from sts.cli.pretrain import EMPTY_KEY, NEWLINE_KEY, SymbolicAnswers, view_points

    cfg, weights = TinyModelConfig(), BASE_WEIGHTS[family]
    processor = build_processor(cfg, family)
    newline = None if family == "llava" else load_extra(weights, NEWLINE_KEY)
    model = build_model(cfg, base=True, family=family)
    scorer = SymbolicAnswers(model, cfg, processor.tokenizer, load_extra(weights, EMPTY_KEY), newline)
    return scorer, processor, view_points(cfg, family)[1]


def test_symbolic_tile_tokens_do_not_say_a_side_no_tile_feature_can_carry():
    """A tile's tower sees that tile alone, so the symbolic scene gives a tile token its cell's colour
    and shape only; the base view's tokens, seeing the whole image, say the side as well."""
    scorer, processor, _ = shipped_scorer("llava-next")
    scene = [{"colour": "red", "shape": "circle", "row": 0, "col": 3}]
    with torch.no_grad():
        tokens = scorer.describe([scene])[0]
        red, circle, right = scorer.embed_tokens(
            torch.tensor(processor.tokenizer.convert_tokens_to_ids(["red", "circle", "right"]))
        )
    base_view_token = scorer.cells.index((0, 3))
    tile_token = scorer.cells.index((0, 3), 64)
    torch.testing.assert_close(tokens[base_view_token], red + circle + right)
    torch.testing.assert_close(tokens[tile_token], red + circle)


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_base_language_model_answers_every_question_type_from_symbolic_scenes(family, tmp_path):
    """The base LM must already reason over a scene, so the demo's stages only have to teach
    the projector (and LM) to see; position included, the type that once sat at chance."""
    from sts.cli.data.dataset import LlavaDataset
    from sts.cli.data.synth import QUESTION_TYPES, generate
    from sts.cli.pretrain import SceneBatches, held_out_accuracy

    scorer, processor, image_size = shipped_scorer(family)
    paths = generate(tmp_path, train=1, test=48, seed=99, questions=10, image_size=image_size)
    batch = next(iter(SceneBatches(LlavaDataset(paths["test"], processor), 48, seed=0)))
    accuracy = held_out_accuracy(scorer, batch)
    assert set(accuracy) == {"overall", *QUESTION_TYPES}
    assert all(value >= 0.9 for value in accuracy.values()), accuracy


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_base_language_model_describes_symbolic_scenes(family, tmp_path):
    """Alignment trains the projector on captions with the language model frozen, so the base
    LM must already caption a scene (LLaVA-1.5's plain format), as a real LLM can describe."""
    from sts.cli.data.dataset import LlavaDataset
    from sts.cli.data.synth import generate
    from sts.cli.pretrain import SceneBatches, held_out_accuracy

    scorer, processor, image_size = shipped_scorer(family)
    paths = generate(tmp_path, train=1, test=1, seed=98, align=48, image_size=image_size)
    batch = next(iter(SceneBatches(LlavaDataset(paths["align"], processor, template="plain"), 48, seed=0)))
    assert held_out_accuracy(scorer, batch)["overall"] >= 0.9, "caption words predicted from the scene"

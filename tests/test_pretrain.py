import torch

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


def test_shipped_base_weights_keep_pretraining_state_out_of_the_model():
    from safetensors.torch import load_file

    from sts.cli.models.tiny import BASE_WEIGHTS, EXTRA_PREFIX, build_model
    from sts.compat import in_model_layout

    stored = load_file(str(BASE_WEIGHTS))
    model = build_model(base=False)
    assert {k for k in in_model_layout(stored, model) if not k.startswith(EXTRA_PREFIX)} <= set(model.state_dict())
    assert all(torch.isfinite(v).all() for v in stored.values())


def test_shipped_base_language_model_answers_every_question_type_from_symbolic_scenes(tmp_path):
    """The base LM must already reason over a scene, so the demo's stages only have to teach
    the projector (and LM) to see; position included, the type that once sat at chance."""
    from sts.cli.data.dataset import LlavaDataset
    from sts.cli.data.synth import QUESTION_TYPES, generate
    from sts.cli.models.tiny import BASE_WEIGHTS, build_model, build_processor, load_extra
    from sts.cli.pretrain import EMPTY_KEY, SceneBatches, SymbolicAnswers, held_out_accuracy

    cfg = TinyModelConfig()
    paths = generate(tmp_path, train=1, test=48, seed=99, questions=10)
    processor = build_processor(cfg)
    batch = next(iter(SceneBatches(LlavaDataset(paths["test"], processor), 48, seed=0)))
    scorer = SymbolicAnswers(build_model(cfg, base=True), cfg, processor.tokenizer, load_extra(BASE_WEIGHTS, EMPTY_KEY))
    accuracy = held_out_accuracy(scorer, batch)
    assert set(accuracy) == {"overall", *QUESTION_TYPES}
    assert all(value >= 0.9 for value in accuracy.values()), accuracy


def test_shipped_base_language_model_describes_symbolic_scenes(tmp_path):
    """Alignment trains the projector on captions with the language model frozen, so the base
    LM must already caption a scene (LLaVA-1.5's plain format), as a real LLM can describe."""
    from sts.cli.data.dataset import LlavaDataset
    from sts.cli.data.synth import generate
    from sts.cli.models.tiny import BASE_WEIGHTS, build_model, build_processor, load_extra
    from sts.cli.pretrain import EMPTY_KEY, SceneBatches, SymbolicAnswers, held_out_accuracy

    cfg = TinyModelConfig()
    paths = generate(tmp_path, train=1, test=1, seed=98, align=48)
    processor = build_processor(cfg)
    batch = next(iter(SceneBatches(LlavaDataset(paths["align"], processor, template="plain"), 48, seed=0)))
    scorer = SymbolicAnswers(build_model(cfg, base=True), cfg, processor.tokenizer, load_extra(BASE_WEIGHTS, EMPTY_KEY))
    assert held_out_accuracy(scorer, batch)["overall"] >= 0.9, "caption words predicted from the scene"

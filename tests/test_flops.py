import statistics

import pytest
from torch.utils.flop_counter import FlopCounterMode

import sts
from sts.adapters import get_adapter
from sts.cli.data.collate import Collator
from sts.cli.data.dataset import LlavaDataset
from sts.cli.flops import Shapes, deep_segments, train_step_flops
from sts.cli.models.tiny import build_model
from tests.conftest import TEST_SIZES

STAGES = {
    "align": {"vision_tower": False, "projector": True, "language_model": False},
    "instruct": {"vision_tower": False, "projector": True, "language_model": True},
    "everything": {"vision_tower": True, "projector": True, "language_model": True},
}


@pytest.fixture(scope="module")
def batch(synth_data, processor):
    dataset = LlavaDataset(synth_data["train"], processor)
    return Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])


def measured_step(model, batch):
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("sparsity", [None, "vtc", "lds", "deep-cuts-and-lds"])
def test_analytic_flops_match_the_flop_counter(batch, stage, sparsity):
    model = build_model(TEST_SIZES.model_copy(update={"text_layers": 6}), base=False).train()
    model.set_attn_implementation("eager")  # the counter does not see the CPU's fused SDPA kernel
    get_adapter(model).set_trainable({k: "full" if v else "frozen" for k, v in STAGES[stage].items()})
    if sparsity == "vtc":
        sts.apply_sts(model, {"vtc": {"strategy": "uniform", "keep_ratio": 0.25}})
    elif sparsity == "lds":
        sts.apply_sts(model, {"lds": {"alpha": 0.9}})
    elif sparsity == "deep-cuts-and-lds":  # cuts after layers 2 and 4; some layers skipped
        deep_cuts = [[0.34, 0.5], [0.67, 0.25]]
        sts.apply_sts(model, {"vtc": {"keep_ratio": 0.5, "deep_cuts": deep_cuts}, "lds": {"alpha": 0.9}})
    measured = measured_step(model, batch)
    length, layers_run, deep = batch["input_ids"].shape[1], 6, ()
    if sparsity:
        stats = sts.step_stats(model)
        length, layers_run = stats["lm_seq_len"], 6 - len(stats["skipped_layers"])
        deep = deep_segments(6, stats["skipped_layers"], stats["deep_seq_lens"])
        assert layers_run < 6 if sparsity == "lds" else length < batch["input_ids"].shape[1]
        assert [layer for layer, _ in stats["deep_seq_lens"]] == ([2, 4] if sparsity.startswith("deep") else [])
    predicted = sum(
        train_step_flops(
            Shapes.of(model.config),
            len(batch["input_ids"]),
            length,
            len(batch["pixel_values"]),
            STAGES[stage],
            layers_run,
            deep,
        ).values()
    )
    assert predicted == pytest.approx(measured, rel=0.05)


def test_analytic_recipe_flops_of_deep_cuts_are_what_a_forward_with_them_counts(synth_data, processor):
    """`recipe_flops` (the 7B projections) predicts from a recipe what one sample's forward with the
    compressor and two deep cuts really runs: the meter's count from its stats."""
    from sts.cli.flops import recipe_flops
    from sts.cli.recipes import load_recipe

    deep_cuts = [[0.34, 0.5], [0.67, 0.25]]
    vtc = {"strategy": "pool", "keep_ratio": 0.25, "deep_cuts": deep_cuts}
    model = build_model(TEST_SIZES.model_copy(update={"text_layers": 6}), base=False).train()
    sample = Collator(processor.tokenizer.pad_token_id)([LlavaDataset(synth_data["train"], processor)[0]])
    sts.apply_sts(model, {"vtc": vtc})
    sts.set_progress(model, 0, 10)
    model(**sample)
    stats = sts.step_stats(model)
    assert [layer for layer, _ in stats["deep_seq_lens"]] == [2, 4]
    counted = train_step_flops(
        Shapes.of(model.config),
        1,
        stats["lm_seq_len"],
        1,
        STAGES["instruct"],
        6,
        deep_segments(6, [], stats["deep_seq_lens"]),
    )
    recipe = load_recipe("demo", ["data.train=x", "lds=null", f"stages.1.vtc={vtc}"])
    text = int((sample["input_ids"] != model.config.image_token_id).sum())
    _, predicted = recipe_flops(recipe, model.config, {"align": (1, text), "instruct": (1, text)}, [1.0, 1.0])
    assert predicted == pytest.approx(sum(counted.values()))


def test_llava_15_projection_has_llava_15s_shape():
    """At LLaVA-1.5-7B shapes and data lengths alignment is about 30% of the recipe's FLOPs, and
    the compressor's gain grows with the visual share (93% visual in align, 70% in instruct)."""
    from sts.cli.demo import RECIPES, llava_15_flops
    from sts.cli.recipes import load_recipe

    baseline = llava_15_flops(load_recipe("demo", ["data.train=x", *RECIPES["baseline"]]), [1.0, 1.0])
    assert 0.27 < baseline[0] / sum(baseline) < 0.33
    sparse = llava_15_flops(load_recipe("demo", ["data.train=x", *RECIPES["sts-max"]]), [1.0, 1.0])
    align_gain, instruct_gain = baseline[0] / sparse[0], baseline[1] / sparse[1]
    assert align_gain > instruct_gain > 1.5
    half = llava_15_flops(load_recipe("demo", ["data.train=x", *RECIPES["baseline"]]), [0.5, 1.0])
    assert half[0] == pytest.approx(baseline[0] / 2) and half[1] == baseline[1]


@pytest.mark.parametrize("preset", ["llava-1.5", "llava-next"])
def test_each_demo_preset_is_a_scale_model_of_its_7b_training(preset, synth_data, processor):
    """On the demo's data and tiny model (LLaVA, or its anyres form), alignment's share of the FLOPs
    and every demo recipe's FLOPs-ideal speedup are within 10% of what they are at the 7B model's
    shapes and data (LLaVA-1.5-7B, LLaVA-NeXT-7B), so what STS saves in the demo is what it would
    save there."""
    from sts.cli.data.dataset import LlavaDataset
    from sts.cli.demo import PRESETS, RECIPES, llava_15_flops, llava_next_flops
    from sts.cli.flops import recipe_flops
    from sts.cli.models import tiny
    from sts.cli.presets import image_geometry
    from sts.cli.recipes import load_recipe

    shape, seven_b_flops = PRESETS[preset], {"llava-1.5": llava_15_flops, "llava-next": llava_next_flops}[preset]
    image = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def text_tokens(dataset) -> float:  # the same text at any image size
        return statistics.mean(int((dataset[i]["input_ids"] != image).sum()) for i in range(len(dataset)))

    lengths = {
        "align": text_tokens(LlavaDataset(synth_data["align"], processor, template="plain")),
        "instruct": text_tokens(LlavaDataset(synth_data["train"], processor)),
    }

    def ideal_speedups(name):
        recipe = load_recipe("demo", ["data.train=x", *shape.overrides, *RECIPES[name]])
        data = {stage.name: (stage.max_steps * stage.batch_size, lengths[stage.name]) for stage in recipe.stages}
        config = tiny.build_config(recipe.model.tiny, recipe.model.family)
        geometry = image_geometry(config, (shape.image_size, shape.image_size))
        return recipe_flops(recipe, config, data, [1.0, 1.0], geometry), seven_b_flops(recipe, [1.0, 1.0])

    base_here, base_7b = ideal_speedups("baseline")
    assert base_here[0] / sum(base_here) == pytest.approx(base_7b[0] / sum(base_7b), rel=0.1)
    for name in RECIPES:
        here, seven_b = ideal_speedups(name)
        assert sum(base_here) / sum(here) == pytest.approx(sum(base_7b) / sum(seven_b), rel=0.1), name

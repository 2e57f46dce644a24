import json
import statistics

import pytest
import torch
from transformers import AutoModelForImageTextToText

from sts.cli.bench import FLASH_KERNELS, SETTINGS, build_rounds, run_bench
from sts.cli.commands import BENCH_PRESETS
from sts.cli.flops import Shapes, samples_step_flops, train_step_flops
from sts.cli.presets import PRESETS, preset
from sts.cli.synthetic import LLAVA_LENGTHS, ImageLayout, draw_samples, synthetic_batch, visual_tokens


def test_bench_times_every_setting_against_the_fastest_dense_batch_and_records_json(tmp_path):
    result = run_bench("tiny", steps=2, warmup=1, batch=2, out=tmp_path, packing="on")
    recorded = json.loads(next(tmp_path.glob("bench-tiny-*.json")).read_text())
    assert recorded == json.loads(json.dumps(result))
    assert list(recorded["settings"]) == [s.name for s in SETTINGS]
    rows, baselines = recorded["settings"], recorded["baselines"]
    assert baselines["align"] in ("align", "align+packed") and baselines["instruct"] in ("instruct", "instruct+packed")
    for stage, baseline in baselines.items():
        dense = [rows[stage]["steps_per_s"], rows[f"{stage}+packed"]["steps_per_s"]]
        assert rows[baseline]["steps_per_s"] == max(dense) and rows[baseline]["speedup"] == 1.0
    assert rows["instruct+pool0.25"]["against"] == baselines["instruct"] and rows["instruct+pool0.25"]["packed"]
    assert rows["instruct+sts-off"]["against"] == "instruct" and not rows["instruct+sts-off"]["packed"]
    # Padding is no work: dense padded and packed batches do the same FLOPs.
    assert rows["instruct"]["flops_ideal_speedup"] == rows["instruct+packed"]["flops_ideal_speedup"] == 1.0
    assert rows["align+vtc0.25"]["flops_ideal_speedup"] > 1.5
    assert rows["instruct+lds0.5"]["flops_ideal_speedup"] >= 1.0
    assert rows["instruct+pool0.25"]["flops_ideal_speedup"] > 1.5
    for row in rows.values():
        assert row["steps_per_s"] > 0 and row["speedup_over_ideal"] > 0
    assert len(recorded["sample_tokens"]["instruct"]) == 3, "a batch of drawn lengths a round"


def test_grouped_batches_waste_less_on_padding_than_batches_drawn_at_random():
    spec = preset("tiny")
    layout = ImageLayout(spec.config, spec.image)

    def padding(lengths: str) -> float:
        rounds = build_rounds(layout, "instruct", 247, 8, 6, lengths, torch.device("cpu"))
        return sum(max(r.lengths) * len(r.lengths) - sum(r.lengths) for r in rounds) / sum(
            sum(r.lengths) for r in rounds
        )

    assert padding("grouped") < padding("sampled") / 4
    assert padding("fixed") == 0


def test_a_deep_cut_counts_in_the_ideal_and_every_step_is_recorded_and_profiled():
    deep = ["instruct", "instruct+pool0.25", "instruct+pool0.25+deep"]
    result = run_bench(
        "tiny", steps=2, warmup=0, batch=2, out=None, settings=deep, lengths="fixed", packing="on", profile=True
    )
    rows = result["settings"]
    assert rows["instruct+pool0.25+deep"]["flops_ideal_speedup"] > rows["instruct+pool0.25"]["flops_ideal_speedup"]
    assert rows["instruct+pool0.25"]["packed"] and not rows["instruct+pool0.25+deep"]["packed"], "deep: padded only"
    assert all(len(row["step_seconds"]) == 2 for row in rows.values())
    for row in rows.values():
        step = row["profile"]
        assert 0 < step["busy_ms"] and 0 < step["wall_ms"] and any("mm" in op["name"] for op in step["top"])


def test_packing_is_on_only_where_the_kernel_skips_across_samples():
    result = run_bench(
        "tiny", steps=1, warmup=0, batch=2, out=None, settings=["align", "align+packed"], lengths="fixed"
    )
    assert result["attention"] == "sdpa" and not result["packing"] and list(result["settings"]) == ["align"]


def test_a_kernel_that_is_not_installed_is_one_line_naming_it(capsys):
    from sts.cli.commands import main

    if FLASH_KERNELS["flash_attention_2"]():
        pytest.skip("FlashAttention-2 is installed here")
    assert main(["bench", "--attention", "flash_attention_2", "--steps", "1", "--out", ""]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sts: error: --attention flash_attention_2: its package is not installed here, or it needs a GPU"
    )


def test_an_unknown_setting_is_one_line_naming_the_settings(capsys):
    from sts.cli.commands import main

    assert main(["bench", "--settings", "instruct,instruct+pool", "--steps", "1", "--out", ""]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("sts: error: --settings: no setting instruct+pool; there are align, align+packed")


def test_sampled_lengths_keep_the_stage_mean_and_llava_665ks_text_only_share():
    samples = draw_samples("instruct", 247, 20000, True, torch.Generator().manual_seed(0))
    text_only = sum(not s.image for s in samples) / len(samples)
    assert abs(text_only - LLAVA_LENGTHS["instruct"].text_only_share) < 0.01
    assert abs(statistics.mean(s.text for s in samples) / 247 - 1) < 0.05
    assert statistics.pstdev(s.text for s in samples) > 100, "a spread, not one length"
    fixed = draw_samples("instruct", 247, 4, False, torch.Generator())
    assert all(s.text == 247 and s.image for s in fixed)


@pytest.mark.parametrize("name", ["tiny", "tiny-llava-next", "tiny-qwen2.5-vl"])
def test_synthetic_batches_are_what_each_family_expects(name):
    spec = preset(name)
    layout = ImageLayout(spec.config, spec.image)
    samples = draw_samples("instruct", 30, 16, True, torch.Generator().manual_seed(3))
    assert any(not s.image for s in samples), "text-only samples beside images"
    batch = synthetic_batch(layout, samples, torch.Generator().manual_seed(0))
    image_tokens = (batch["input_ids"] == layout.image_token).sum(1).tolist()
    assert image_tokens == visual_tokens(layout, samples)
    model = AutoModelForImageTextToText.from_config(spec.config)
    loss = model(**batch).loss  # the model's own check that its image features fill the image tokens
    assert torch.isfinite(loss)


def test_the_gpu_presets_have_the_published_widths():
    assert BENCH_PRESETS == list(PRESETS)
    seven_b = preset("llava-1.5-7b")
    assert seven_b.text_tokens == {"align": 43, "instruct": 247}, "LLaVA-1.5's caption and conversation lengths"
    shapes = Shapes.of(seven_b.config)
    assert (shapes.text_hidden, shapes.text_intermediate, shapes.text_layers) == (4096, 11008, 32)
    assert shapes.image_tokens == 576 and shapes.vision_hidden == 1024
    shapes = Shapes.of(preset("llava-1.5-0.5b").config)
    assert (shapes.text_hidden, shapes.text_layers, shapes.text_kv_hidden) == (896, 24, 128)
    next_7b = preset("llava-next-7b")
    layout = ImageLayout(next_7b.config, next_7b.image)
    assert (layout.tokens, layout.tower_images) == (2928, 5), "576 base + 48 rows of 48 tiles' tokens and a newline"
    assert Shapes.of(next_7b.config).text_layers == 32
    qwen = preset("qwen2.5-vl-7b", layers=4)
    assert ImageLayout(qwen.config, qwen.image).tokens == 34 * 46 // 4
    shapes = Shapes.of(qwen.config)
    assert (shapes.text_hidden, shapes.text_layers, shapes.text_kv_hidden, shapes.vision_layers) == (3584, 4, 512, 0)


def test_samples_flops_of_equal_lengths_are_the_padded_batchs():
    shapes = Shapes.of(preset("llava-1.5-7b").config)
    trains = {"vision_tower": False, "projector": True, "language_model": True}
    padded = train_step_flops(shapes, 4, 800, 4, trains, 20)
    assert samples_step_flops(shapes, [800] * 4, 4, trains, 20) == pytest.approx(padded)
    shorter = sum(samples_step_flops(shapes, [200, 800, 800, 800], 4, trains).values())
    assert shorter < sum(train_step_flops(shapes, 4, 800, 4, trains).values())


@pytest.mark.parametrize("name", ["tiny", "tiny-llava-next", "tiny-qwen2.5-vl"])
def test_the_flops_geometry_keeps_what_the_compressor_keeps(name):
    """`sts.cli.flops` counts an image's kept tokens from its geometry (anyres: the base view and the
    tiles' grid, newlines kept): what a compressed forward really keeps, on each family."""
    import sts

    spec = preset(name)
    layout = ImageLayout(spec.config, spec.image)
    samples = draw_samples("instruct", 30, 3, False, torch.Generator())
    batch = synthetic_batch(layout, samples, torch.Generator().manual_seed(0))
    model = AutoModelForImageTextToText.from_config(spec.config).train()
    for vtc in [
        {"strategy": "pool", "keep_ratio": 0.25},
        {"strategy": "uniform", "keep_ratio": 0.5},
        {"strategy": "pool", "keep_ratio": 0.25, "tile_keep_ratio": 0.0625},
        {"strategy": "pool", "keep_ratio": 0.25, "tile_keep_ratio": 0.0625, "merge_newlines": True},
        {"strategy": "uniform", "keep_ratio": 0.25, "merge_newlines": True},
    ]:
        sts.apply_sts(model, {"vtc": vtc})
        sts.set_progress(model, 0, 10)
        model(**batch)
        stats = sts.step_stats(model)
        assert stats["visual_tokens_in"] == 3 * layout.geometry.tokens()
        assert stats["visual_tokens_kept"] == 3 * layout.geometry.kept(
            vtc["strategy"], vtc["keep_ratio"], vtc.get("tile_keep_ratio"), vtc.get("merge_newlines", False)
        ), vtc
        sts.remove_sts(model)


def test_anyres_7b_training_has_more_to_gain_than_llava_15s():
    """At LLaVA-NeXT-7B's shapes (2,928 visual tokens an image) the same recipes save more than at
    LLaVA-1.5-7B's, and alignment is a similar share of the FLOPs."""
    from sts.cli.demo import RECIPES, llava_15_flops, llava_next_flops
    from sts.cli.recipes import load_recipe

    def ideal(flops, name):
        base = flops(load_recipe("demo", ["data.train=x", *RECIPES["baseline"]]), [1.0, 1.0])
        return sum(base) / sum(flops(load_recipe("demo", ["data.train=x", *RECIPES[name]]), [1.0, 1.0])), base

    next_ideal, next_base = ideal(llava_next_flops, "sts-max")
    assert next_ideal > ideal(llava_15_flops, "sts-max")[0] > 2
    assert 0.2 < next_base[0] / sum(next_base) < 0.35
    geometry = ImageLayout(preset("llava-next-7b").config, (672, 672)).geometry
    assert geometry.kept("pool", 0.25) == 12 * 12 + 24 * 24 + 48, "each grid pooled 2 x 2, the 48 newlines kept"
    assert geometry.kept("pool", 0.25, 0.0625) == 12 * 12 + 12 * 12 + 48, "the tiles pooled to the base's grid"
    assert geometry.kept("pool", 0.25, 0.0625, True) == 12 * 12 + 12 * 12 + 12, "a newline for each pooled row"

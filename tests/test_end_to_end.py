import json

import pytest
import torch

from sts.cli import main
from sts.cli.data.dataset import LlavaDataset
from tests.conftest import TEST_SIZES


def tiny_overrides(synth_data, out):
    sizes = [f"model.tiny.{k}={v}" for k, v in TEST_SIZES.model_dump().items()]
    return [
        f"data.train={synth_data['train']}",
        f"stages.0.data.train={synth_data['align']}",
        f"output_dir={out}",
        "model.base=false",
        "stages.0.max_steps=3",
        "stages.1.max_steps=3",
        "stages.0.batch_size=8",
        "stages.1.batch_size=8",
        "stages.0.logging_steps=1",
        *sizes,
    ]


def test_train_then_eval_through_the_cli(synth_data, tmp_path, capsys):
    assert main(["train", "demo", *tiny_overrides(synth_data, tmp_path / "run")]) == 0
    model_dir = tmp_path / "run" / "instruct" / "model"
    assert (model_dir / "model.safetensors").exists()

    from transformers import AutoModelForImageTextToText

    align = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "align" / "model").state_dict()
    final = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()
    lm_key = next(k for k in final if "language_model" in k and k.endswith("q_proj.weight"))
    tower_key = next(k for k in final if "vision_tower" in k and k.endswith("q_proj.weight"))
    assert not torch.equal(align[lm_key], final[lm_key]), "stage 2 trains the language model"
    assert torch.equal(align[tower_key], final[tower_key]), "the vision tower stays frozen"

    assert (
        main(
            [
                "eval",
                "--model",
                str(model_dir),
                "--data",
                str(synth_data["test"]),
                "--json",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["questions"] == 6 * 2
    assert set(result["per_type"]) == {"colour", "shape", "count", "exist", "position"}
    assert 0.0 <= result["accuracy"] <= 1.0
    assert "overall" in capsys.readouterr().out


def test_stage_one_trains_only_the_projector(synth_data, tmp_path):
    from sts.cli.recipes import load_recipe
    from sts.cli.train import initial_model, run_stage

    recipe = load_recipe("demo", tiny_overrides(synth_data, tmp_path))
    model, processor = initial_model(recipe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = LlavaDataset(synth_data["align"], processor, template="plain")
    run_stage(recipe.stages[0], model, processor, dataset, tmp_path / "align", seed=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)


def test_cli_reports_config_errors_in_one_line(synth_data, tmp_path, capsys):
    assert main(["train", "demo", f"data.train={synth_data['train']}", "stages.0.learning_rat=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sts: error:") and "stages.0.learning_rat" in err and "\n" not in err


@pytest.mark.parametrize(
    "command",
    [
        ["bench", "--steps", "0"],
        ["eval", "--model", "m", "--data", "d", "--limit", "0"],
        ["demo", "--train", "-5"],
        ["data", "check", "d.json", "--max-length", "x"],
        ["demo", "--preset", "llava-2"],
    ],
)
def test_a_bad_number_on_the_command_line_is_one_line(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main(command)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and err[-1].startswith("sts ") and f"argument {command[-2]}" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_a_synthetic_image_size_that_is_no_multiple_of_the_scenes_is_one_line(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--image-size", "100", "--train", "1", "--test", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sts: error: --image-size 100: must be a multiple of 64 px"]
    assert not list(tmp_path.iterdir()), "nothing written"


def test_the_demo_presets_named_on_the_command_line_are_the_demos():
    from sts.cli.commands import DEMO_PRESETS
    from sts.cli.demo import PRESETS

    assert DEMO_PRESETS == list(PRESETS)


def test_the_anyres_demo_trains_llava_next_from_the_same_scenes_drawn_twice_as_large(tmp_path):
    from PIL import Image

    from sts.cli.demo import RECIPES, run_demo

    sizes = [f"model.tiny.{k}={v}" for k, v in TEST_SIZES.model_dump().items()]
    steps = ["stages.0.max_steps=2", "stages.1.max_steps=2", "stages.0.batch_size=4", "stages.1.batch_size=4"]
    recipes = {name: RECIPES[name] for name in ("baseline", "sts-max")}
    extra = [*sizes, *steps, "model.base=false"]
    results = run_demo(tmp_path, train=8, test=2, recipes=recipes, extra=extra, equal_time=False, preset="llava-next")
    assert results["preset"] == "llava-next"
    record = json.loads((tmp_path / "data" / "test.json").read_text())[0]
    assert Image.open(tmp_path / "data" / record["image"]).size == (128, 128)
    baseline, most = results["runs"]["baseline"], results["runs"]["sts-max"]
    config = json.loads((tmp_path / "sts-max" / "seed-0" / "instruct" / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    # alignment keeps a sixteenth of the 320 base and tile tokens (and the 16 newlines): 46 of 346 tokens
    assert most["stages"][0]["samples"] == baseline["stages"][0]["samples"]
    assert most["stages"][0]["flops"] < baseline["stages"][0]["flops"] / 4


def test_eval_of_missing_model_is_a_clear_error(synth_data, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "none"), "--data", str(synth_data["test"])]) == 2
    assert "no model checkpoint" in capsys.readouterr().err


def test_demo_compares_the_recipes_over_seeds_and_writes_results(tmp_path):
    import statistics

    from sts.cli.demo import EQUAL_TIME, PRESETS, run_demo

    sizes = [f"model.tiny.{k}={v}" for k, v in TEST_SIZES.model_dump().items()]
    steps = [
        "stages.0.max_steps=6",
        "stages.1.max_steps=6",
        "stages.0.batch_size=8",
        "stages.1.batch_size=8",
        "stages.0.logging_steps=1",
        "stages.1.logging_steps=1",
        "model.base=false",
    ]
    results = run_demo(tmp_path, train=24, test=3, seed=1, extra=[*sizes, *steps], seeds=[1, 2])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seeds"] == [1, 2]
    assert list(saved["runs"]) == [*PRESETS["llava-1.5"].recipes, EQUAL_TIME]
    assert list(saved["runs"]) == ["baseline", "sts", "sts-full-tail", EQUAL_TIME]
    for name, run in saved["runs"].items():
        assert set(run["per_type"]) == {"colour", "shape", "count", "exist", "position"}
        assert set(run["seeds"]) == {"1", "2"}
        for seed, seeded in run["seeds"].items():
            assert seeded["model_dir"] == str(tmp_path / name / f"seed-{seed}" / "instruct" / "model")
            assert (tmp_path / name / f"seed-{seed}" / "instruct" / "model" / "config.json").exists()
        accuracies = [seeded["accuracy"] for seeded in run["seeds"].values()]
        assert run["accuracy"] == statistics.mean(accuracies)
        assert (run["spread"]["accuracy"]["min"], run["spread"]["accuracy"]["max"]) == (
            min(accuracies),
            max(accuracies),
        )
        assert run["train_seconds"] == statistics.mean(s["train_seconds"] for s in run["seeds"].values()) > 0
    baseline, sparse = saved["runs"]["baseline"], saved["runs"]["sts"]
    assert baseline["speedup"] == 1.0 and baseline["flops_ideal_speedup"] == 1.0
    # Scaled to 7B trainings, anyres images (LLaVA-NeXT) leave the compressor more to take.
    most = saved["runs"]["sts-full-tail"]
    assert most["llava_next_ideal_speedup"] > most["llava_15_ideal_speedup"] > 1.5
    # The compressor really shortens alignment: fewer FLOPs for the same samples.
    assert sparse["stages"][0]["flops"] < 0.7 * baseline["stages"][0]["flops"]
    assert sparse["stages"][0]["samples"] == baseline["stages"][0]["samples"]
    # The equal-time baseline: per seed and stage, the steps that fit in the fastest STS recipe's time.
    for seed in ("1", "2"):
        dense = baseline["seeds"][seed]["stages"]
        fastest = min(
            (saved["runs"][n]["seeds"][seed] for n in ("sts", "sts-full-tail")), key=lambda r: r["train_seconds"]
        )
        cut = saved["runs"][EQUAL_TIME]["seeds"][seed]["stages"]
        for full, fast, short in zip(dense, fastest["stages"], cut):
            assert short["steps"] == max(1, round(full["steps"] * fast["seconds"] / full["seconds"]))
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    expected = sparse["accuracy"] / baseline["accuracy"] if baseline["accuracy"] else None
    assert results["runs"]["sts"]["retention"] == expected


def test_a_stage_saves_checkpoints_and_resumes_from_one(synth_data, tmp_path):
    from sts.cli.recipes import load_recipe
    from sts.cli.train import run_recipe

    saving = [
        *tiny_overrides(synth_data, tmp_path),
        "stages.1.max_steps=6",
        "stages.1.save_steps=2",
        "stages.1.save_total_limit=2",
        "stages.1.logging_steps=1",
    ]
    run_recipe(load_recipe("demo", saving))
    checkpoints = sorted(p.name for p in (tmp_path / "instruct").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-4", "checkpoint-6"], "every 2 steps, the newest two kept"

    resume = tmp_path / "instruct" / "checkpoint-4"
    again = [*saving, f"output_dir={tmp_path / 'again'}", f"stages.1.resume_from_checkpoint={resume}"]
    resumed = run_recipe(load_recipe("demo", [*again, "stages.1.save_steps=0"]))
    instruct = resumed["stages"][1]
    assert [step for _, step, _ in instruct["losses"]] == [5, 6], "steps 1-4 came from the checkpoint"
    from transformers import AutoModelForImageTextToText

    checkpoint = AutoModelForImageTextToText.from_pretrained(tmp_path / "instruct" / "checkpoint-6").state_dict()
    final = AutoModelForImageTextToText.from_pretrained(instruct["model_dir"]).state_dict()
    assert all(torch.allclose(final[key], checkpoint[key]) for key in final), "training went on from step 4's weights"


def test_resuming_from_a_missing_checkpoint_is_a_clear_error(synth_data, tmp_path, capsys):
    assert main(["train", "demo", *tiny_overrides(synth_data, tmp_path), "stages.1.resume_from_checkpoint=latest"]) == 2
    assert "stages.instruct.resume_from_checkpoint: no Trainer checkpoint" in capsys.readouterr().err


def test_a_stage_trains_on_length_grouped_batches(synth_data, tmp_path, monkeypatch):
    from sts.cli.recipes import load_recipe
    from sts.cli.train import run_recipe

    counted = []
    original = LlavaDataset.lengths
    monkeypatch.setattr(LlavaDataset, "lengths", lambda self: counted.append(self.template) or original(self))
    result = run_recipe(load_recipe("demo", [*tiny_overrides(synth_data, tmp_path), "stages.1.group_by_length=true"]))
    assert counted == ["chat"], "the instruct stage's sampler grouped by length; align's did not"
    assert result["stages"][1]["steps"] == 3

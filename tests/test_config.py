import pytest

from sts.cli.recipes import ConfigError, load_recipe


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


GOOD = """
data: {train: d/train.json}
stages:
  - {name: align, learning_rate: 1.0e-3}
"""


def test_shipped_demo_recipe_parses():
    recipe = load_recipe("demo")
    assert [s.name for s in recipe.stages] == ["align", "instruct"]
    assert recipe.stages[0].train.language_model == "frozen"
    assert recipe.stages[1].train.language_model == "full"


def test_overrides_set_nested_keys(tmp_path):
    recipe = load_recipe(
        write(tmp_path, GOOD), ["stages.0.learning_rate=5e-4", "model.tiny.text_layers=3", "output_dir=elsewhere"]
    )
    assert recipe.stages[0].learning_rate == 5e-4
    assert recipe.model.tiny.text_layers == 3
    assert recipe.output_dir == "elsewhere"


@pytest.mark.parametrize(
    "override, key",
    [
        ("stages.0.learnig_rate=1", "stages.0.learnig_rate"),
        ("stages.0.learning_rate=-1", "stages.0.learning_rate"),
        ("stages.0.train.projector=half", "stages.0.train.projector"),
        ("model.tiny.text_layerz=2", "model.tiny.text_layerz"),
        ("stages.0.train.projector=frozen", "stages.0.train"),  # a stage that trains nothing
        ("model.path=/no/such/checkpoint", "model.path"),
        ("stages.0.on_nonfinite_loss=maybe", "stages.0.on_nonfinite_loss"),
        ("distributed=horovod", "distributed"),
    ],
)
def test_bad_key_or_value_is_one_line_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as error:
        load_recipe(write(tmp_path, GOOD), [override])
    message = str(error.value)
    assert key in message and "\n" not in message


def test_unknown_recipe_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="shipped: .*demo"):
        load_recipe("no-such-recipe")
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(write(tmp_path, GOOD), ["stages.0.learning_rate"])
    with pytest.raises(ConfigError, match="stages"):
        load_recipe(write(tmp_path, GOOD), ["stages.5.learning_rate=1"])


def test_stage_names_must_be_unique(tmp_path):
    with pytest.raises(ConfigError, match="unique"):
        load_recipe(write(tmp_path, GOOD.replace("stages:\n", "stages:\n  - {name: align, learning_rate: 1.0}\n")))


def test_demo_recipe_selection_defines_variants_and_always_runs_the_baseline():
    from sts.cli.demo import RECIPES, select_recipes

    assert list(select_recipes(None)) == ["baseline", "sts", "sts-full-tail"]
    assert list(select_recipes(None, "llava-next")) == ["baseline", "sts-tiles-base-tail", "sts-tiles-merged"]
    assert all(recipe == RECIPES[name] for name, recipe in select_recipes(None, "llava-next").items())
    assert select_recipes(["sts-deep"])["sts-deep"] == RECIPES["sts-deep"], "a shipped recipe beyond the defaults"
    with pytest.raises(ConfigError, match="--preset 'llava-2'"):
        select_recipes(None, "llava-2")
    chosen = select_recipes(["sts", "pool=vtc.strategy=pool lds=null"])
    assert list(chosen) == ["baseline", "sts", "pool"]
    assert chosen["pool"] == ["vtc.strategy=pool", "lds=null"]
    with pytest.raises(ConfigError, match="'stss'"):
        select_recipes(["stss"])
    # every variant must still be a valid recipe
    for overrides in chosen.values():
        load_recipe("demo", overrides)


STAGED = """
data: {train: d/train.json}
stages:
  - {name: align, learning_rate: 1.0e-3}
  - {name: instruct, learning_rate: 1.0e-4}
vtc: {strategy: distinct, stages: [align]}
lds: {alpha: 0.5, stages: [instruct]}
"""


def test_a_stage_block_wins_over_the_recipe_block_in_that_stage_only(tmp_path):
    recipe = load_recipe(write(tmp_path, STAGED), ["stages.1.vtc={strategy: pool, full_tokens_final_fraction: 0.2}"])
    align, instruct = (recipe.sts_for(stage) for stage in recipe.stages)
    assert align.vtc.strategy == "distinct" and align.vtc.full_tokens_final_fraction == 0 and align.lds is None
    assert instruct.vtc.strategy == "pool" and instruct.vtc.full_tokens_final_fraction == 0.2
    assert instruct.lds.alpha == 0.5


def test_a_stage_block_may_not_name_stages(tmp_path):
    with pytest.raises(ConfigError, match="stages.1.vtc"):
        load_recipe(write(tmp_path, STAGED), ["stages.1.vtc={strategy: pool, stages: [align]}"])


def test_dropping_steps_is_refused_where_deepspeed_owns_the_optimizer(tmp_path):
    with pytest.raises(ConfigError, match="stages.0.on_nonfinite_loss"):
        load_recipe(write(tmp_path, GOOD), ["distributed=zero3", "stages.0.on_nonfinite_loss=skip"])


def test_shipped_anyres_recipe_carries_the_measured_demo_recipe(tmp_path):
    """`sts train llava-next` compresses each stage as `sts-tiles-base-tail` did on the anyres scale
    model, so the README's figures describe what a user of the shipped recipe runs."""
    from sts.cli.demo import PRESETS, RECIPES

    (tmp_path / "config.json").write_text("{}")
    shipped = load_recipe("llava-next", [f"model.path={tmp_path}"])
    measured = load_recipe("demo", [*RECIPES["sts-tiles-base-tail"], *PRESETS["llava-next"].overrides])
    for real, demo in zip(shipped.stages, measured.stages, strict=True):
        assert shipped.sts_for(real).vtc == measured.sts_for(demo).vtc
        assert shipped.sts_for(real).lds is None and measured.sts_for(demo).lds is None

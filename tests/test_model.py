import os
import random
import subprocess
import sys

import pytest
import torch

from sts.cli.models.tiny import BASE_WEIGHTS, FAMILIES, build_model, build_processor, is_base_part
from sts.cli.recipes import TinyModelConfig
from tests.conftest import TEST_SIZES


@pytest.mark.parametrize("family", FAMILIES)
def test_base_weights_load_and_projector_stays_random(family):
    from safetensors.torch import load_file

    from sts.compat import in_model_layout

    first, second = build_model(seed=1, family=family), build_model(seed=2, family=family)
    a, b = first.state_dict(), second.state_dict()
    shipped = in_model_layout(load_file(str(BASE_WEIGHTS[family])), first)  # each form's own base
    for key in a:
        if is_base_part(key):
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], shipped[key]), key
        elif key.endswith("weight") or key.endswith("image_newline"):  # (biases start at zero)
            assert not torch.equal(a[key], b[key]), f"{key} should be random, not shipped"
    assert BASE_WEIGHTS[family].stat().st_size < 20_000_000


def test_the_anyres_form_reads_a_scene_twice_the_towers_size_as_a_base_view_and_2x2_tiles():
    """336 visual tokens (8 x 8 base, 16 x 16 tiles, 16 newlines) from 5 views through the tower,
    as LLaVA-NeXT-7B reads a 672 px image with its 336 px tower; the FLOPs count all 5 views."""
    from sts.adapters import get_adapter
    from sts.cli.data.synth import draw_scene, random_scene
    from sts.cli.presets import image_geometry

    model, processor = build_model(TEST_SIZES, base=False, family="llava-next"), build_processor(family="llava-next")
    scene = draw_scene(random_scene(random.Random(0)), size=2 * TEST_SIZES.image_size)
    inputs = processor(text="USER: <image>\nHow many circles are there? ASSISTANT:", images=scene, return_tensors="pt")
    geometry = image_geometry(model.config, scene.size)
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert visual == geometry.tokens() == 8 * 8 + 16 * 16 + 16
    assert tuple(inputs["pixel_values"].shape[:2]) == (1, geometry.tower_images) == (1, 5)
    assert get_adapter(model).tower_images_in(inputs) == 5 and get_adapter(model).images_in(inputs) == 1


def test_base_weights_refuse_other_sizes():
    with pytest.raises(ValueError, match="base weights"):
        build_model(TinyModelConfig(text_hidden=64), base=True)


LOAD_WITHOUT_STS = """
import sys, torch
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1])
size = int(sys.argv[3])
ids = processor(text="USER: <image>\\nHow many circles are there? ASSISTANT:", images=torch.zeros(3, size, size),
                return_tensors="pt")
ids.pop("token_type_ids", None)
torch.save(model(**ids).logits, sys.argv[2])
assert not any(name == "sts" or name.startswith("sts.") for name in sys.modules), "sts was imported"
"""


@pytest.mark.parametrize("family, size", [("llava", 64), ("llava-next", 128)])
def test_save_pretrained_round_trip_offline_without_sts(family, size, tmp_path):
    model = build_model(TEST_SIZES, base=False, family=family).eval()
    processor = build_processor(TEST_SIZES, family)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_STS, str(tmp_path / "m"), str(tmp_path / "logits.pt"), str(size)],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    prompt = "USER: <image>\nHow many circles are there? ASSISTANT:"
    inputs = processor(text=prompt, images=torch.zeros(3, size, size), return_tensors="pt")
    inputs.pop("token_type_ids", None)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5)

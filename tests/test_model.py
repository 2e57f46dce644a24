import os
import subprocess
import sys

import torch

from sts.cli.models.tiny import BASE_WEIGHTS, build_model, build_processor, is_base_part
from sts.cli.recipes import TinyModelConfig
from tests.conftest import TEST_SIZES


def test_base_weights_load_and_projector_stays_random():
    first, second = build_model(seed=1), build_model(seed=2)
    a, b = first.state_dict(), second.state_dict()
    for key in a:
        if is_base_part(key):
            assert torch.equal(a[key], b[key]), key
        elif key.endswith("weight"):  # (biases start at zero)
            assert not torch.equal(a[key], b[key]), f"{key} should be random, not shipped"
    assert BASE_WEIGHTS.exists() and BASE_WEIGHTS.stat().st_size < 20_000_000


def test_base_weights_refuse_other_sizes():
    import pytest

    with pytest.raises(ValueError, match="base weights"):
        build_model(TinyModelConfig(text_hidden=64), base=True)


LOAD_WITHOUT_STS = """
import sys, torch
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1])
ids = processor(text="USER: <image>\\nHow many circles are there? ASSISTANT:", images=torch.zeros(3, 64, 64),
                return_tensors="pt")
ids.pop("token_type_ids", None)
torch.save(model(**ids).logits, sys.argv[2])
assert not any(name == "sts" or name.startswith("sts.") for name in sys.modules), "sts was imported"
"""


def test_save_pretrained_round_trip_offline_without_sts(tmp_path):
    model, processor = build_model(TEST_SIZES, base=False).eval(), build_processor(TEST_SIZES)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_STS, str(tmp_path / "m"), str(tmp_path / "logits.pt")],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    inputs = processor(
        text="USER: <image>\nHow many circles are there? ASSISTANT:", images=torch.zeros(3, 64, 64), return_tensors="pt"
    )
    inputs.pop("token_type_ids", None)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5)

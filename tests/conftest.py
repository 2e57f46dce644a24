import pytest

from sts.cli.data.collate import Collator
from sts.cli.data.dataset import LlavaDataset
from sts.cli.data.synth import generate
from sts.cli.models.tiny import build_model, build_processor
from sts.cli.recipes import TinyModelConfig

# Small enough for fast CPU tests; base weights fit only the default sizes.
TEST_SIZES = TinyModelConfig(
    vision_hidden=32, vision_layers=1, text_hidden=64, text_layers=2, text_heads=2, text_intermediate=128
)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return generate(out, train=48, test=6, seed=7, align=16)


@pytest.fixture(scope="session")
def processor():
    return build_processor()


@pytest.fixture
def model():
    """A tiny random-weight LLaVA in training mode (a test file may define its own)."""
    return build_model(TEST_SIZES, seed=3, base=False).train()


@pytest.fixture(scope="module")
def batch(synth_data, processor):
    dataset = LlavaDataset(synth_data["train"], processor)
    samples = [dataset[i] for i in range(4)]
    # Ragged lengths: the second sample loses its last turn, so the batch is padded.
    samples[1] = {**samples[1], "input_ids": samples[1]["input_ids"][:-8], "labels": samples[1]["labels"][:-8]}
    return Collator(processor.tokenizer.pad_token_id)(samples)

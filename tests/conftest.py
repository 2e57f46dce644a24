import pytest

from sts.cli.data.synth import generate
from sts.cli.models.tiny import build_processor
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

"""What the examples fall back to without --model / --data: a tiny random-weight checkpoint of
the named family and synthetic LLaVA-format data, so every example runs anywhere."""

from pathlib import Path

from sts.data.synth import generate
from sts.models.families import save_tiny


def model_and_data(model: str | None, data: str | None, folder: Path,
                   family: str = "LlavaForConditionalGeneration") -> tuple[str, str]:
    model = model or str(save_tiny(family, folder / "model"))
    data = data or str(generate(folder / "data", train=64, test=1)["train"])
    return model, data

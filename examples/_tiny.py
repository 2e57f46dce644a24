"""What the examples share: their command line, and what they fall back to without --model /
--data (a tiny random-weight checkpoint of the named family and synthetic LLaVA-format data),
so every example runs anywhere."""

import argparse
from pathlib import Path

from sts.cli.data.synth import generate
from sts.cli.models.families import save_tiny


def arguments(doc: str, out: str | None = None) -> argparse.ArgumentParser:
    """--model, --data, --steps, and --out if the example writes anything."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", help="a local checkpoint; default: a tiny random-weight one")
    parser.add_argument("--data", help="a LLaVA-format JSON; default: synthetic")
    parser.add_argument("--steps", type=int, default=20)
    if out:
        parser.add_argument("--out", default=out)
    return parser


def model_and_data(
    model: str | None, data: str | None, folder: Path, family: str = "LlavaForConditionalGeneration"
) -> tuple[str, str]:
    model = model or str(save_tiny(family, folder / "model"))
    data = data or str(generate(folder / "data", train=64, test=1)["train"])
    return model, data

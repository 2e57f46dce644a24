"""Loading a local checkpoint folder: sts never downloads weights, and reads them only from
safetensors (a pickled .bin file can run code when loaded); a checkpoint's own Python code
runs only when the recipe trusts it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from sts.cli.recipes import ConfigError


def load_model_and_processor(path: str | Path, trust_remote_code: bool = False):
    """A local checkpoint folder; sts never downloads weights, and reads them only from
    safetensors (a pickled .bin file can run code when loaded)."""
    model = load_model(path, trust_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, TypeError) as error:  # TypeError: transformers 5.0 without torchvision
        if importlib.util.find_spec("torchvision") is None:
            needs = "torchvision (the Qwen-VL and OneVision video processors use it)"
        elif isinstance(error, ImportError):
            needs = str(error).split(" but ")[0].strip()
        else:
            raise
        raise ConfigError(
            f"model.path: {path}: its processor needs {needs}, which is not installed here; install it "
            "(torchvision: the build that matches your torch)"
        ) from None
    return model, processor


def load_model(path: str | Path, trust_remote_code: bool = False):
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"no model checkpoint (config.json) in {path}")
    if not any(Path(path).glob("*.safetensors")):
        raise FileNotFoundError(
            f"no safetensors weights in {path}: sts does not load pickled weights (.bin), "
            "which can run code; convert them with save_pretrained(safe_serialization=True)"
        )
    try:
        return AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise ConfigError(
            f"model.path: {path} needs its own Python code to load; set model.trust_remote_code=true if you trust it"
        ) from None

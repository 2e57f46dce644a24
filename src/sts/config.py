"""Typed configs for every YAML knob; a wrong key or value is a one-line error naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sts.models.tiny import TinyModelConfig

RECIPES_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Mode = Literal["frozen", "full"]


class PartsConfig(Strict):
    """Which parts a stage trains (LLaVA stage 1: projector only; stage 2: projector + LM)."""

    vision_tower: Mode = "frozen"
    projector: Mode = "full"
    language_model: Mode = "frozen"


class StageConfig(Strict):
    name: str
    train: PartsConfig = PartsConfig()
    learning_rate: float = Field(gt=0)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, description="overrides epochs when > 0")
    batch_size: int = Field(default=32, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_scheduler: str = "cosine"
    logging_steps: int = Field(default=10, ge=1)
    gradient_checkpointing: bool = False
    bf16: bool = False


class ModelConfig(Strict):
    path: str | None = Field(default=None, description="a local checkpoint; None builds the tiny model")
    tiny: TinyModelConfig = TinyModelConfig()
    base: bool = Field(default=True, description="tiny model: start from the shipped pre-trained tower and LM")


class DataConfig(Strict):
    train: str
    images: str | None = Field(default=None, description="image folder; defaults to the JSON file's folder")


class RecipeConfig(Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig
    stages: list[StageConfig] = Field(min_length=1)
    output_dir: str = "runs/train"
    seed: int = 0

    @field_validator("stages")
    @classmethod
    def unique_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique (each names its output folder), got {names}")
        return stages


def apply_override(tree: dict, assignment: str) -> None:
    """`stages.1.learning_rate=1e-4` sets that key; the value is read as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key=value")
    key, raw = assignment.split("=", 1)
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(leaf)] = yaml.safe_load(raw)
    else:
        node[leaf] = yaml.safe_load(raw)


def resolve_recipe_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a recipe shipped with sts (e.g. `demo`)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise ConfigError(f"no config file {name_or_path!r} and no shipped recipe of that name (shipped: {known})")


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> RecipeConfig:
    tree = yaml.safe_load(resolve_recipe_path(name_or_path).read_text()) or {}
    for assignment in overrides:
        try:
            apply_override(tree, assignment)
        except (IndexError, ValueError, TypeError) as error:
            raise ConfigError(f"override {assignment!r} does not fit the config: {error}") from None
    return parse(RecipeConfig, tree)


def parse(schema: type[BaseModel], tree: dict):
    try:
        return schema.model_validate(tree)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "<root>"
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise ConfigError(f"config error at {where}: {first['msg']}{more}") from None

"""Recipes of `sts train`: typed configs for every YAML knob; a wrong key or value is a
one-line error naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sts.config import LDSConfig, Strict, STSConfig, VTCConfig

RECIPES_DIR = Path(__file__).resolve().parent / "configs"
# transformers' schedulers that need neither scheduler arguments nor evaluation metrics
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


class TinyModelConfig(Strict):
    """Sizes of the embedded model. The defaults are what the shipped base weights fit."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_intermediate: int = 344


Mode = Literal["frozen", "full"]


class PartsConfig(Strict):
    """Which parts a stage trains (LLaVA stage 1: projector only; stage 2: projector + LM)."""

    vision_tower: Mode = "frozen"
    projector: Mode = "full"
    language_model: Mode = "frozen"


class DataConfig(Strict):
    # hashable: stages reading the same data share it
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    train: str
    images: str | None = Field(default=None, description="image folder; defaults to the JSON file's folder")
    template: Literal["chat", "plain"] = Field(
        default="chat",
        description="chat: the processor's chat template; plain: LLaVA-1.5's alignment format, "
        "the images then the first answer, no instruction",
    )
    cache: bool = Field(
        default=False,
        description="keep every encoded record (pixels included) in memory, "
        "encoded before training: for small data (the demo) only",
    )
    max_length: int | None = Field(
        default=None, gt=0, description="truncate samples' text to this many tokens; never inside an image's tokens"
    )
    on_bad_sample: Literal["error", "skip"] = Field(
        default="error",
        description="a bad record (wrong turns, a missing or unreadable image, too long for "
        "max_length): error stops the run naming the file and record; skip leaves it out, with a warning naming it",
    )


class StageConfig(Strict):
    name: str
    data: DataConfig | None = Field(default=None, description="this stage's own data; wins over the recipe's")
    train: PartsConfig = PartsConfig()
    learning_rate: float = Field(gt=0)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, description="overrides epochs when > 0")
    batch_size: int = Field(default=32, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_scheduler: str = Field(default="cosine", description="a transformers scheduler (SchedulerType)")
    logging_steps: int = Field(default=10, ge=1)
    gradient_checkpointing: bool = False
    bf16: bool = False
    dataloader_num_workers: int = Field(default=0, ge=0, description="processes encoding samples while training")
    group_by_length: bool = Field(
        default=False,
        description="batches of records of similar length (counted "
        "from their text and image count, without encoding): less padding",
    )
    packing: bool = Field(
        default=False,
        description="the language model reads each batch as one padding-free row of its samples, after "
        "the cut (STS's pack)",
    )
    report_to: list[str] = Field(default=["none"], description="the Trainer's loggers, e.g. [tensorboard] or [wandb]")
    save_steps: int = Field(default=0, ge=0, description="save a resumable checkpoint every N steps; 0: none")
    save_total_limit: int | None = Field(default=None, ge=1, description="keep only the newest N checkpoints")
    resume_from_checkpoint: str | None = Field(
        default=None, description="a checkpoint folder of this stage (output_dir/<stage>/checkpoint-N), or 'latest'"
    )
    on_nonfinite_loss: Literal["error", "skip"] = Field(
        default="error",
        description="a NaN or infinite loss: error stops the run naming the step; skip drops "
        "that optimizer step (its gradients are discarded) and goes on",
    )
    vtc: VTCConfig | None = Field(default=None, description="this stage's own compressor; wins over the recipe's")
    lds: LDSConfig | None = Field(default=None, description="this stage's own skipper; wins over the recipe's")

    @field_validator("lr_scheduler")
    @classmethod
    def usable_scheduler(cls, name: str) -> str:
        if name not in SCHEDULERS:
            raise ValueError(
                f"{name!r} is not a scheduler sts train can drive (sts train gives a scheduler no "
                f"arguments and evaluates nothing); choose one of {', '.join(SCHEDULERS)}"
            )
        return name

    @field_validator("report_to")
    @classmethod
    def known_loggers(cls, names: list[str]) -> list[str]:
        if set(names) <= {"none"}:
            return names
        from transformers.integrations import get_available_reporting_integrations
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        for name in names:
            if name not in ("none", "all", *INTEGRATION_TO_CALLBACK):
                raise ValueError(
                    f"{name!r} is not a logger transformers knows; choose from none, all, "
                    f"{', '.join(INTEGRATION_TO_CALLBACK)}"
                )
            if name not in ("none", "all") and name not in get_available_reporting_integrations():
                raise ValueError(f"{name!r} is a logger whose package is not installed here")
        return names

    @field_validator("train")
    @classmethod
    def trains_something(cls, parts: PartsConfig) -> PartsConfig:
        if all(mode == "frozen" for mode in parts.model_dump().values()):
            raise ValueError("every part is frozen: the stage would train nothing")
        return parts

    @field_validator("vtc", "lds")
    @classmethod
    def no_stage_list(cls, block):
        if block is not None and "stages" in block.model_fields_set:
            raise ValueError("a stage's own block applies to that stage; `stages:` belongs to the recipe-level block")
        return block


class ModelConfig(Strict):
    path: str | None = Field(default=None, description="a local checkpoint; None builds the tiny model")
    tiny: TinyModelConfig = TinyModelConfig()
    family: Literal["llava", "llava-next"] = Field(
        default="llava",
        description="tiny model: LLaVA (one view), or LLaVA-NeXT's anyres form (a base view and 2 x 2 "
        "tiles of images twice the tower's size, newline tokens) on its own base weights",
    )
    base: bool = Field(default=True, description="tiny model: start from the shipped pre-trained tower and LM")
    trust_remote_code: bool = Field(
        default=False,
        description="run Python code shipped with the checkpoint "
        "(its auto_map); off: only transformers' own model classes load",
    )

    @field_validator("path")
    @classmethod
    def a_checkpoint(cls, path: str | None) -> str | None:
        if path is not None and not (Path(path) / "config.json").is_file():
            raise ValueError(f"{path} is not a model checkpoint folder (no config.json)")
        return path


class RecipeConfig(Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig
    stages: list[StageConfig] = Field(min_length=1)
    vtc: VTCConfig | None = None
    lds: LDSConfig | None = None
    output_dir: str = "runs/train"
    seed: int = 0
    resume: bool = Field(
        default=False,
        description="continue an interrupted run in output_dir: finished stages "
        "are kept, the unfinished one goes on from its newest checkpoint (stages.N.save_steps); only a run "
        "with the same fingerprint (sts.cli.runs) is continued",
    )
    overwrite: bool = Field(
        default=False, description="delete the recipe's stage folders in output_dir (another run's work) and start over"
    )
    distributed: Literal["ddp", "fsdp", "zero2", "zero3"] = Field(
        default="ddp",
        description="how the processes of a torchrun / accelerate launch share the work: ddp "
        "replicates the model; fsdp shards it per decoder layer (FSDP2); zero2 / zero3: DeepSpeed ZeRO with the "
        "shipped config (or deepspeed_config). A process no launcher started: plain training",
    )
    deepspeed_config: str | None = Field(
        default=None, description="a DeepSpeed JSON for zero2 / zero3 instead of the shipped one"
    )

    @field_validator("stages")
    @classmethod
    def unique_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique (each names its output folder), got {names}")
        return stages

    @field_validator("deepspeed_config")
    @classmethod
    def a_file(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_file():
            raise ValueError(f"no DeepSpeed config file at {path}")
        return path

    @model_validator(mode="after")
    def resume_or_overwrite(self) -> RecipeConfig:
        if self.resume and self.overwrite:
            raise ValueError("resume=true continues the run in output_dir and overwrite=true deletes it: choose one")
        return self

    @model_validator(mode="after")
    def skipping_steps_needs_our_optimizer(self) -> RecipeConfig:
        for index, stage in enumerate(self.stages):
            if self.distributed.startswith("zero") and stage.on_nonfinite_loss == "skip":
                raise ValueError(
                    f"stages.{index}.on_nonfinite_loss: skip cannot drop a step of DeepSpeed's own "
                    f"optimizer; use error with distributed: {self.distributed}"
                )
        return self

    def sts_for(self, stage: StageConfig) -> STSConfig:
        """The STS blocks active in this stage (none for a plain stage): the stage's own block,
        else the recipe's block if its `stages:` name this stage."""
        vtc = stage.vtc or (self.vtc if self.vtc and stage.name in self.vtc.stages else None)
        lds = stage.lds or (self.lds if self.lds and stage.name in self.lds.stages else None)
        return STSConfig(vtc=vtc, lds=lds, pack=stage.packing, seed=self.seed)

    def data_for(self, stage: StageConfig) -> DataConfig:
        return stage.data or self.data


def apply_override(tree: dict, assignment: str) -> None:
    """`stages.1.learning_rate=1e-4` sets that key; the value is read as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key=value")
    key, raw = assignment.split("=", 1)
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    value = yaml.safe_load(raw)
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value


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


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what, and where (line and column of the text read)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> RecipeConfig:
    path = resolve_recipe_path(name_or_path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"recipe {path} cannot be read ({getattr(error, 'strerror', None) or error})") from None
    except yaml.YAMLError as error:  # plain YAML only: a !!python tag is refused here, never run
        raise ConfigError(f"recipe {path} is not valid YAML: {yaml_problem(error)}") from None
    for assignment in overrides:
        try:
            apply_override(tree, assignment)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {assignment!r}: its value is not valid YAML: {yaml_problem(error)}") from None
        except (IndexError, ValueError, TypeError, AttributeError) as error:
            raise ConfigError(f"override {assignment!r} does not fit the config: {error}") from None
    return parse(RecipeConfig, tree)


def parse(schema: type[BaseModel], tree: dict):
    try:
        return schema.model_validate(tree)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise ConfigError(f"config error{f' at {where}' if where else ''}: {message}{more}") from None

"""Recipes: one or more stages, each a `transformers.Trainer` run.

A stage trains the parts it names, then saves a plain transformers checkpoint (model and
processor) that the next stage starts from. The last stage's checkpoint is the result.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from sts.adapters import get_adapter
from sts.config import RecipeConfig, StageConfig
from sts.data.llava import Collator, LlavaDataset
from sts.models import tiny


def load_model_and_processor(path: str | Path):
    """A local checkpoint folder; sts never downloads weights."""
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"no model checkpoint (config.json) in {path}")
    model = AutoModelForImageTextToText.from_pretrained(path, torch_dtype=torch.float32)
    return model, AutoProcessor.from_pretrained(path)


def initial_model(cfg: RecipeConfig):
    if cfg.model.path:
        return load_model_and_processor(cfg.model.path)
    model = tiny.build_model(cfg.model.tiny, seed=cfg.seed, base=cfg.model.base)
    return model, tiny.build_processor(cfg.model.tiny)


def training_arguments(stage: StageConfig, output_dir: Path, seed: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.gradient_accumulation_steps,
        learning_rate=stage.learning_rate,
        num_train_epochs=stage.epochs,
        max_steps=stage.max_steps,
        lr_scheduler_type=stage.lr_scheduler,
        warmup_ratio=stage.warmup_ratio,
        weight_decay=stage.weight_decay,
        logging_steps=stage.logging_steps,
        gradient_checkpointing=stage.gradient_checkpointing,
        bf16=stage.bf16,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=seed,
        data_seed=seed,
    )


class LossClock(TrainerCallback):
    """Records (seconds since the stage began, step, loss) at every logging step."""

    def __init__(self):
        self.started = time.perf_counter()
        self.points: list[tuple[float, int, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.points.append((time.perf_counter() - self.started, state.global_step, logs["loss"]))


def run_stage(stage: StageConfig, model, processor, dataset, output_dir: Path, seed: int) -> dict:
    get_adapter(model).set_trainable(stage.train.model_dump())
    clock = LossClock()
    trainer = Trainer(
        model=model,
        args=training_arguments(stage, output_dir, seed),
        train_dataset=dataset,
        data_collator=Collator(processor.tokenizer.pad_token_id),
        callbacks=[clock],
    )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    model_dir = output_dir / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return {
        "name": stage.name,
        "seconds": seconds,
        "steps": result.global_step,
        "samples": result.global_step * stage.batch_size * stage.gradient_accumulation_steps,
        "train_loss": result.training_loss,
        "losses": clock.points,
        "model_dir": str(model_dir),
    }


def run_recipe(cfg: RecipeConfig) -> dict:
    """Train every stage in order; return per-stage figures and the final model's folder."""
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    model, processor = initial_model(cfg)
    dataset = LlavaDataset(cfg.data.train, processor, cfg.data.images)
    stages = []
    for index, stage in enumerate(cfg.stages):
        if index > 0:
            model, processor = load_model_and_processor(stages[-1]["model_dir"])
        stages.append(run_stage(stage, model, processor, dataset, output_dir / stage.name, cfg.seed))
    return {
        "model_dir": stages[-1]["model_dir"],
        "train_seconds": sum(s["seconds"] for s in stages),
        "stages": stages,
    }

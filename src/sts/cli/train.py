"""Recipes: one or more stages, each a `transformers.Trainer` run.

A stage trains the parts it names, then saves a plain transformers checkpoint (model and
processor) that the next stage starts from. The last stage's checkpoint is the result.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from pathlib import Path

import torch
from transformers import (
    TrainingArguments,
    set_seed,
)

from sts.adapters import get_adapter
from sts.callback import STSCallback
from sts.cli.checkpoints import load_model, load_model_and_processor
from sts.cli.data.collate import Collator
from sts.cli.data.dataset import LlavaDataset
from sts.cli.distributed import launched
from sts.cli.meters import PeakMemory, StepMeter
from sts.cli.models import tiny
from sts.cli.recipe_trainer import RecipeTrainer
from sts.cli.recipes import ConfigError, RecipeConfig, StageConfig
from sts.cli.runs import check_room, fingerprints, prepare_output, settle
from sts.compat import checkpointing_arguments
from sts.config import STSConfig
from sts.lds import can_skip
from sts.patch import apply_sts, remove_sts

DEEPSPEED_CONFIGS = Path(__file__).resolve().parent / "configs" / "deepspeed"


def initial_model(cfg: RecipeConfig):
    if cfg.model.path:
        return load_model_and_processor(cfg.model.path, cfg.model.trust_remote_code)
    model = tiny.build_model(cfg.model.tiny, seed=cfg.seed, base=cfg.model.base, family=cfg.model.family)
    return model, tiny.build_processor(cfg.model.tiny, cfg.model.family)


def training_arguments(stage: StageConfig, output_dir: Path, seed: int, **engine) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.gradient_accumulation_steps,
        learning_rate=stage.learning_rate,
        num_train_epochs=stage.epochs,
        max_steps=stage.max_steps,
        lr_scheduler_type=stage.lr_scheduler,
        warmup_steps=stage.warmup_ratio,  # a float below 1 is a ratio of the steps
        weight_decay=stage.weight_decay,
        logging_steps=stage.logging_steps,
        **checkpointing_arguments(stage.gradient_checkpointing),
        bf16=stage.bf16,
        save_strategy="steps" if stage.save_steps else "no",
        save_steps=stage.save_steps or 500,
        save_total_limit=stage.save_total_limit,
        report_to=stage.report_to,
        remove_unused_columns=False,
        dataloader_num_workers=stage.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=seed,
        data_seed=seed,
        **engine,
    )


def engine_arguments(engine: str, deepspeed_config: str | None, model, unused_parameters: bool) -> dict:
    """TrainingArguments for `engine` (ddp | fsdp | zero2 | zero3; plain in a process no launcher
    started). DDP walks the autograd graph for parameters a step leaves without gradients only if
    some may be (`unused_parameters`);
    FSDP2 shards each decoder layer on its own, so a skipped layer is never gathered."""
    arguments = {"use_cpu": not torch.cuda.is_available(), "ddp_find_unused_parameters": unused_parameters}
    if not launched():
        return arguments
    if engine == "fsdp" and not torch.cuda.is_available():
        raise ConfigError("distributed: fsdp runs on GPUs (accelerate shards only there); on CPU use ddp")
    if engine in ("zero2", "zero3") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"distributed: {engine} needs DeepSpeed (pip install deepspeed)")
    if engine == "fsdp":
        layer = type(get_adapter(model).decoder_layers()[0]).__name__
        arguments.update(
            fsdp=True,
            fsdp_config={
                "version": 2,
                "transformer_layer_cls_to_wrap": [layer],
                "reshard_after_forward": True,
                "state_dict_type": "FULL_STATE_DICT",
            },
        )
    elif engine in ("zero2", "zero3"):
        arguments["deepspeed"] = deepspeed_config or str(DEEPSPEED_CONFIGS / f"{engine}.json")
    return arguments


@contextlib.contextmanager
def quiet_reload():
    """Silence the Trainer's missing/unexpected-key warnings of its checkpoint reload (see run_stage)."""
    logger = logging.getLogger("transformers.trainer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def checkpoint_to_resume(stage: StageConfig, output_dir: Path, resuming_run: bool = False) -> Path | None:
    """The stage's `resume_from_checkpoint`: a folder, or 'latest' (its newest checkpoint-N); in a
    resumed run (`resume: true`), its newest checkpoint if it has one."""
    if stage.resume_from_checkpoint not in (None, "latest"):
        folder = Path(stage.resume_from_checkpoint)
    elif stage.resume_from_checkpoint == "latest" or resuming_run:
        numbered = [path for path in output_dir.glob("checkpoint-*") if path.name.split("-", 1)[1].isdigit()]
        saved = sorted(numbered, key=lambda path: int(path.name.split("-", 1)[1]))
        if not saved and resuming_run:
            return None
        folder = saved[-1] if saved else output_dir / "checkpoint-<none>"
    else:
        return None
    if not (folder / "trainer_state.json").exists():
        raise FileNotFoundError(f"stages.{stage.name}.resume_from_checkpoint: no Trainer checkpoint at {folder}")
    return folder


def run_stage(
    stage: StageConfig,
    model,
    processor,
    dataset,
    output_dir: Path,
    seed: int,
    sts: STSConfig | None = None,
    distributed: str = "ddp",
    deepspeed_config: str | None = None,
    resuming_run: bool = False,
    fingerprint: dict | None = None,
) -> dict:
    """Train one stage; STS is always attached (an empty config enables nothing) so that every
    stage, baseline included, is metered the same way. A resumed stage starts from its
    checkpoint's weights (loaded here: transformers 5.24's Trainer reloads them without the key
    conversion LLaVA-style checkpoints need, so its own reload finds no key and changes nothing)
    and the Trainer restores the optimizer, schedule, step and data order. In a run of several
    processes, rank 0 saves the model (gathered whole from FSDP or ZeRO-3 shards) and the others
    wait for it, so the next stage can load it. `fingerprint` (sts.cli.runs) is recorded beside
    what the stage publishes."""
    settle(output_dir)  # what a killed run left half-published or half-written
    resume = checkpoint_to_resume(stage, output_dir, resuming_run)
    if resume is not None:
        model = load_model(resume)
    parts = stage.train.model_dump()
    get_adapter(model).set_trainable(parts)
    sts = sts or STSConfig()
    apply_sts(model, sts)
    meter = StepMeter(model, {k: v == "full" for k, v in parts.items()})
    # Parameters without gradients: skipped layers, and a trained vision tower's layers after the
    # one whose features the model uses (LLaVA reads the second-to-last).
    unused = can_skip(get_adapter(model).num_layers, sts.lds) or parts["vision_tower"] == "full"
    engine = engine_arguments(distributed, deepspeed_config, model, unused)
    trainer = RecipeTrainer(
        stage_name=stage.name,
        on_nonfinite_loss=stage.on_nonfinite_loss,
        group_by_length=stage.group_by_length,
        fingerprint=fingerprint,
        model=model,
        args=training_arguments(stage, output_dir, seed, **engine),
        train_dataset=dataset,
        data_collator=Collator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        callbacks=[meter],
    )
    STSCallback.add_to(trainer)
    with PeakMemory() as memory:
        started = time.perf_counter()
        with quiet_reload() if resume else contextlib.nullcontext():
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        seconds = time.perf_counter() - started
    remove_sts(model)
    model_dir = output_dir / "model"
    trainer.save_model_whole(model_dir)  # with the processor: a folder from_pretrained reads whole
    samples = result.global_step * stage.batch_size * stage.gradient_accumulation_steps
    return {
        "name": stage.name,
        "seconds": seconds,
        "steps": result.global_step,
        "samples": samples,
        "samples_per_s": samples / seconds,
        "flops": meter.flops,
        "peak_memory_gb": memory.gigabytes,
        "train_loss": result.training_loss,
        "losses": meter.points,
        "dropped_steps": trainer.dropped_steps,
        "model_dir": str(model_dir),
    }


def run_recipe(cfg: RecipeConfig) -> dict:
    """Train every stage in order; return per-stage figures and the final model's folder. An
    output folder the run may not use is refused before any work (sts.cli.runs)."""
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    prints = fingerprints(cfg)
    prepare_output(cfg, prints)
    model, processor = initial_model(cfg)
    check_room(cfg.output_dir, model, checkpoints=any(stage.save_steps for stage in cfg.stages))
    datasets = {}  # stages that read the same data share one encoding of it
    for data in map(cfg.data_for, cfg.stages):
        if data not in datasets:
            datasets[data] = LlavaDataset(
                data.train, processor, data.images, data.template, data.cache, data.max_length, data.on_bad_sample
            )
            datasets[data].validate()  # a bad record stops the run (or is left out) before any training
            if data.cache:
                datasets[data].encode_all()
    stages = []
    for index, stage in enumerate(cfg.stages):
        finished = output_dir / stage.name / "model"
        if cfg.resume and (finished / "config.json").exists():  # saved whole or not at all (RecipeTrainer)
            stages.append({"name": stage.name, "seconds": 0.0, "done_before": True, "model_dir": str(finished)})
            continue
        if index > 0:
            model, processor = load_model_and_processor(stages[-1]["model_dir"])
        stages.append(
            run_stage(
                stage,
                model,
                processor,
                datasets[cfg.data_for(stage)],
                output_dir / stage.name,
                cfg.seed,
                cfg.sts_for(stage),
                cfg.distributed,
                cfg.deepspeed_config,
                cfg.resume,
                prints[index],
            )
        )
    return {
        "model_dir": stages[-1]["model_dir"],
        "train_seconds": sum(s["seconds"] for s in stages),
        "stages": stages,
        "skipped_records": {data.train: dataset.skipped for data, dataset in datasets.items() if dataset.skipped},
    }

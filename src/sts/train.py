"""Recipes: one or more stages, each a `transformers.Trainer` run.

A stage trains the parts it names, then saves a plain transformers checkpoint (model and
processor) that the next stage starts from. The last stage's checkpoint is the result.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from sts.adapters import get_adapter
from sts.callback import STSCallback
from sts.config import ConfigError, RecipeConfig, StageConfig, STSConfig
from sts.data.llava import Collator, LlavaDataset
from sts.distributed import is_main, world_size
from sts.flops import Shapes, train_step_flops
from sts.lds import can_skip
from sts.models import tiny
from sts.patch import apply_sts, drain_stats, remove_sts
from sts.trainer import STAGING, RecipeTrainer

DEEPSPEED_CONFIGS = Path(__file__).resolve().parent / "configs" / "deepspeed"


def load_model_and_processor(path: str | Path, trust_remote_code: bool = False):
    """A local checkpoint folder; sts never downloads weights, and reads them only from
    safetensors (a pickled .bin file can run code when loaded)."""
    return load_model(path, trust_remote_code), AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(path: str | Path, trust_remote_code: bool = False):
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"no model checkpoint (config.json) in {path}")
    if not any(Path(path).glob("*.safetensors")):
        raise FileNotFoundError(f"no safetensors weights in {path}: sts does not load pickled weights (.bin), "
                                "which can run code; convert them with save_pretrained(safe_serialization=True)")
    try:
        return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                           trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise ConfigError(f"model.path: {path} needs its own Python code to load; set model.trust_remote_code=true "
                          "if you trust it") from None


def initial_model(cfg: RecipeConfig):
    if cfg.model.path:
        return load_model_and_processor(cfg.model.path, cfg.model.trust_remote_code)
    model = tiny.build_model(cfg.model.tiny, seed=cfg.seed, base=cfg.model.base)
    return model, tiny.build_processor(cfg.model.tiny)


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
        activation_checkpointing=stage.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
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
    """TrainingArguments for `engine` (ddp | fsdp | zero2 | zero3; one process: plain). DDP walks the autograd graph
    for parameters a step leaves without gradients only if some may be (`unused_parameters`);
    FSDP2 shards each decoder layer on its own, so a skipped layer is never gathered."""
    arguments = {"use_cpu": not torch.cuda.is_available(), "ddp_find_unused_parameters": unused_parameters}
    if world_size() == 1:
        return arguments
    if engine == "fsdp" and not torch.cuda.is_available():
        raise ConfigError("distributed: fsdp runs on GPUs (accelerate shards only there); on CPU use ddp")
    if engine in ("zero2", "zero3") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"distributed: {engine} needs DeepSpeed (pip install deepspeed)")
    if engine == "fsdp":
        layer = type(get_adapter(model).decoder_layers()[0]).__name__
        arguments.update(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [layer],
                                                 "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"})
    elif engine in ("zero2", "zero3"):
        arguments["deepspeed"] = deepspeed_config or str(DEEPSPEED_CONFIGS / f"{engine}.json")
    return arguments


class StepMeter(TrainerCallback):
    """Records what each step cost: analytic FLOPs of the tokens and layers really run, and
    (seconds, step, loss) points."""

    def __init__(self, model, trains: dict[str, bool]):
        self.model = model
        self.trains = trains
        self.shapes = Shapes.of(model.config)
        self.started = time.perf_counter()
        self.flops = 0.0
        self.points: list[tuple[float, int, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        for forward in drain_stats(self.model):
            layers_run = self.shapes.text_layers - len(forward["skipped_layers"])
            self.flops += sum(train_step_flops(self.shapes, forward["batch_size"], forward["lm_seq_len"],
                                               forward["images"], self.trains, layers_run).values())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.points.append((time.perf_counter() - self.started, state.global_step, logs["loss"]))


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


class PeakMemory:
    """Peak memory of a block: CUDA allocations on a GPU, else resident set size, sampled."""

    def __enter__(self):
        self.peak = 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        else:
            self.running = True
            self.sampler = threading.Thread(target=self.sample, daemon=True)
            self.sampler.start()
        return self

    def sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while self.running:
            with open("/proc/self/statm") as statm:
                self.peak = max(self.peak, int(statm.read().split()[1]) * page)
            time.sleep(0.05)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.sampler.join()

    @property
    def gigabytes(self) -> float:
        return self.peak / 2**30


def checkpoint_to_resume(stage: StageConfig, output_dir: Path, resuming_run: bool = False) -> Path | None:
    """The stage's `resume_from_checkpoint`: a folder, or 'latest' (its newest checkpoint-N); in a
    resumed run (`resume: true`), its newest checkpoint if it has one."""
    if stage.resume_from_checkpoint not in (None, "latest"):
        folder = Path(stage.resume_from_checkpoint)
    elif stage.resume_from_checkpoint == "latest" or resuming_run:
        saved = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
        if not saved and resuming_run:
            return None
        folder = saved[-1] if saved else output_dir / "checkpoint-<none>"
    else:
        return None
    if not (folder / "trainer_state.json").exists():
        raise FileNotFoundError(f"stages.{stage.name}.resume_from_checkpoint: no Trainer checkpoint at {folder}")
    return folder


def run_stage(stage: StageConfig, model, processor, dataset, output_dir: Path, seed: int,
              sts: STSConfig | None = None, distributed: str = "ddp", deepspeed_config: str | None = None,
              resuming_run: bool = False) -> dict:
    """Train one stage; STS is always attached (an empty config enables nothing) so that every
    stage, baseline included, is metered the same way. A resumed stage starts from its
    checkpoint's weights (loaded here: transformers 5.24's Trainer reloads them without the key
    conversion LLaVA-style checkpoints need, so its own reload finds no key and changes nothing)
    and the Trainer restores the optimizer, schedule, step and data order. In a run of several
    processes, rank 0 saves the model (gathered whole from FSDP or ZeRO-3 shards) and the others
    wait for it, so the next stage can load it."""
    resume = checkpoint_to_resume(stage, output_dir, resuming_run)
    if resume is not None:
        model = load_model(resume)
    if is_main():
        shutil.rmtree(output_dir / STAGING, ignore_errors=True)  # what a killed run left half-written
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
    """Train every stage in order; return per-stage figures and the final model's folder."""
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    model, processor = initial_model(cfg)
    datasets = {}  # stages that read the same data share one encoding of it
    for data in map(cfg.data_for, cfg.stages):
        if data not in datasets:
            datasets[data] = LlavaDataset(data.train, processor, data.images, data.template, data.cache,
                                          data.max_length, data.on_bad_sample)
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
        stages.append(run_stage(stage, model, processor, datasets[cfg.data_for(stage)], output_dir / stage.name,
                                cfg.seed, cfg.sts_for(stage), cfg.distributed, cfg.deepspeed_config, cfg.resume))
    return {
        "model_dir": stages[-1]["model_dir"],
        "train_seconds": sum(s["seconds"] for s in stages),
        "stages": stages,
        "skipped_records": {data.train: dataset.skipped for data, dataset in datasets.items() if dataset.skipped},
    }

"""`sts bench`: training throughput at realistic shapes with random weights (no hub).

Every setting is timed in one process, interleaved round by round, so that drift of the
machine hits them alike. A step is forward, backward and the optimizer step. Speedup is
baseline time / setting time; the FLOPs-ideal speedup comes from `sts.cli.flops` with the
tokens and layers each step really ran, and their ratio says how close to ideal we are.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from tqdm import tqdm
from transformers import LlavaConfig, LlavaForConditionalGeneration

import sts
from sts.adapters import get_adapter
from sts.cli.flops import Shapes, train_step_flops
from sts.cli.presets import preset_config
from sts.compat import set_activation_checkpointing

ALIGN = {"vision_tower": "frozen", "projector": "full", "language_model": "frozen"}
INSTRUCT = {"vision_tower": "frozen", "projector": "full", "language_model": "full"}


@dataclass
class Setting:
    name: str
    stage: str  # "align" (projector trains) or "instruct" (projector and language model train)
    sts: dict | None  # None: the unpatched model; its speedup is against its stage's unpatched setting

    @property
    def parts(self) -> dict:
        return ALIGN if self.stage == "align" else INSTRUCT


SETTINGS = [
    Setting("align", "align", None),
    Setting("align+vtc0.25", "align", {"vtc": {"strategy": "uniform", "keep_ratio": 0.25}}),
    Setting("instruct", "instruct", None),
    Setting("instruct+lds0.5", "instruct", {"lds": {"alpha": 0.5, "epsilon": 0.5}}),
    # sts-max's instruction tuning: 2x2 pooling with proportional attention (a 4D float mask)
    Setting(
        "instruct+pool0.25",
        "instruct",
        {"vtc": {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True}},
    ),
    Setting("instruct+uniform0.25", "instruct", {"vtc": {"strategy": "uniform", "keep_ratio": 0.25}}),
    Setting(
        "instruct+pool0.25+lds0.5",
        "instruct",
        {
            "vtc": {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True},
            "lds": {"alpha": 0.5, "epsilon": 0.5},
        },
    ),
    Setting("instruct+sts-off", "instruct", {}),  # apply_sts with nothing enabled: its overhead
]


def synthetic_batch(config: LlavaConfig, batch: int, text_tokens: int, device) -> dict:
    generator = torch.Generator().manual_seed(0)
    vision = config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    text = torch.randint(10, min(config.text_config.vocab_size, 30000), (batch, text_tokens), generator=generator)
    ids = torch.cat([text[:, :1], torch.full((batch, image_tokens), config.image_token_index), text[:, 1:]], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -text_tokens // 4 :] = ids[:, -text_tokens // 4 :]  # the answer: the last quarter of the text
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels}
    return {k: v.to(device) for k, v in batch.items()}


class Timer:
    """CUDA events on a GPU, a synchronised wall clock otherwise."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.started


@dataclass
class Record:
    times: list = field(default_factory=list)
    flops: list = field(default_factory=list)
    lm_tokens: list = field(default_factory=list)
    peak_bytes: int = 0


def run_bench(
    preset: str = "tiny",
    steps: int = 10,
    warmup: int = 2,
    batch: int = 8,
    layers: int | None = None,
    settings: list[str] | None = None,
    out: str | Path | None = "benchmarks/results",
    compile: str = "none",
    optimizer: str = "adamw",
    checkpointing: bool = True,
) -> dict:
    """Time every setting (see the module's docstring); `optimizer` adamw (fused on a GPU) or sgd
    (stateless, as the records before 2026-11-28); `checkpointing`: activations checkpointed in
    instruction tuning, as the shipped recipes do."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config, text_tokens = preset_config(preset, layers)
    config.text_config._attn_implementation = config.vision_config._attn_implementation = "sdpa"
    config.text_config.use_cache = False  # training keeps no KV cache (a compiled layer would guard on its state)
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: a 7B model's CPU init alone takes minutes
        model = LlavaForConditionalGeneration(config).to(dtype=dtype).train()
    shapes = Shapes.of(config)
    inputs = {stage: synthetic_batch(config, batch, text, device) for stage, text in text_tokens.items()}
    chosen = [s for s in SETTINGS if settings is None or s.name in settings]
    records = {s.name: Record() for s in chosen}
    adapter = get_adapter(model)
    runner = compiled(model, compile)

    optimizers = {}  # one per stage: its settings train the same parameters, so they share its state

    def train_as(setting: Setting) -> torch.optim.Optimizer:
        """Make the setting's parts trainable, checkpoint activations as the shipped recipes do (in
        instruction tuning), attach its STS; its stage's optimizer."""
        adapter.set_trainable(setting.parts)
        set_activation_checkpointing(model, checkpointing and setting.stage == "instruct")
        if setting.sts is not None:
            sts.apply_sts(model, setting.sts)
        if setting.stage not in optimizers:
            trainable = [p for p in model.parameters() if p.requires_grad]
            fused = {"fused": True} if device.type == "cuda" and optimizer == "adamw" else {}
            make = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
            optimizers[setting.stage] = make(trainable, lr=1e-6, **fused)
        return optimizers[setting.stage]

    def one_step(setting: Setting, stepper: torch.optim.Optimizer, step: int, record: Record) -> float:
        if setting.sts is not None:
            sts.set_progress(model, max(step, 0), steps)  # LDS sees a whole run's schedule over the timed steps
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        batch_inputs = inputs[setting.stage]
        with Timer(device) as timer:
            runner(**batch_inputs).loss.backward()
            stepper.step()
            stepper.zero_grad(set_to_none=True)
        if step < 0:  # warm-up
            return timer.seconds
        length, layers_run = batch_inputs["input_ids"].shape[1], shapes.text_layers
        if setting.sts is not None:
            stats = sts.step_stats(model)
            length, layers_run = stats["lm_seq_len"], shapes.text_layers - len(stats.get("skipped_layers", []))
        record.times.append(timer.seconds)
        trains = {k: v == "full" for k, v in setting.parts.items()}
        record.flops.append(sum(train_step_flops(shapes, batch, length, batch, trains, layers_run).values()))
        record.lm_tokens.append(batch * length)
        if device.type == "cuda":
            record.peak_bytes = max(record.peak_bytes, torch.cuda.max_memory_allocated())
        return timer.seconds

    # Steps -warmup..-1 warm up, 0..steps-1 are timed. Settings are interleaved round by round, so that
    # drift hits them alike; a whole-model compile keeps one setting's STS attached from its first call
    # (it never sees hooks added later), so there the settings run one after another, each compiled afresh.
    counters.clear()
    warmup_seconds = 0.0
    if compile == "whole":
        for setting in tqdm(chosen, desc=f"bench {preset} (compiled whole)"):
            torch._dynamo.reset()
            stepper = train_as(setting)
            for step in range(-warmup, steps):
                seconds = one_step(setting, stepper, step, records[setting.name])
                warmup_seconds += seconds if step < 0 else 0.0
            sts.remove_sts(model)  # a no-op for an unpatched setting
    else:
        for step in tqdm(range(-warmup, steps), desc=f"bench {preset}"):
            for setting in chosen:
                seconds = one_step(setting, train_as(setting), step, records[setting.name])
                warmup_seconds += seconds if step < 0 else 0.0
                sts.remove_sts(model)  # a no-op for an unpatched setting

    rows = {}
    for setting in chosen:
        record, base = records[setting.name], records.get(setting.stage, records[setting.name])
        seconds, base_seconds = statistics.mean(record.times), statistics.mean(base.times)
        speedup = base_seconds / seconds
        ideal = statistics.mean(base.flops) / statistics.mean(record.flops)
        rows[setting.name] = {
            "steps_per_s": 1 / seconds,
            "samples_per_s": batch / seconds,
            "lm_tokens_per_s": statistics.mean(record.lm_tokens) / seconds,
            "tflops_per_step": statistics.mean(record.flops) / 1e12,
            "peak_memory_gb": record.peak_bytes / 2**30 if record.peak_bytes else None,
            "speedup": speedup,
            "flops_ideal_speedup": ideal,
            "speedup_over_ideal": speedup / ideal,
        }
    result = {
        "preset": preset,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
        "date": datetime.date.today().isoformat(),
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch,
        "decoder_layers": shapes.text_layers,
        "sequence_tokens": {stage: batch_inputs["input_ids"].shape[1] for stage, batch_inputs in inputs.items()},
        "steps": steps,
        "warmup": warmup,
        "compile": compile,
        "optimizer": optimizer,
        "activation_checkpointing": "instruct" if checkpointing else "none",
        "warmup_seconds": warmup_seconds,  # compiling happens here
        "compiled_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "lm_share_of_flops": lm_share(shapes, batch, inputs["instruct"]["input_ids"].shape[1]),
        "settings": rows,
    }
    print(format_bench(result))
    if out:
        compiled_as = "" if compile == "none" else f"-compile-{compile}"
        device_name = result["device"].replace(" ", "_").replace(",", "")
        path = Path(out) / f"bench-{preset}-b{batch}{compiled_as}-{device_name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"recorded {path}")
    return result


def compiled(model, mode: str):
    """What the bench calls: the model itself, `torch.compile(model)`, or the model with each repeated
    block compiled in place (`sts.compile_layers`)."""
    torch._dynamo.config.recompile_limit = 64  # each setting trains other parts, at other lengths: its own graphs
    if mode == "whole":
        return torch.compile(model)
    return sts.compile_layers(model) if mode == "regional" else model


def lm_share(shapes: Shapes, batch: int, length: int) -> float:
    """The language model's share of a full-token instruction-tuning step's FLOPs."""
    parts = train_step_flops(shapes, batch, length, batch, {k: v == "full" for k, v in INSTRUCT.items()})
    return parts["language_model"] / sum(parts.values())


def format_bench(result: dict) -> str:
    head = (
        f"sts bench {result['preset']} on {result['device']} ({result['dtype']}, batch {result['batch']}, "
        f"{result['sequence_tokens']['align']}/{result['sequence_tokens']['instruct']} tokens in align/instruct, "
        f"{result['decoder_layers']} decoder layers, {result['optimizer']}, activation checkpointing: "
        f"{result['activation_checkpointing']}, {result['date']})"
    )
    if result["compile"] != "none":
        head += (
            f"\ncompiled ({result['compile']}): {result['compiled_graphs']} graphs, "
            f"{result['graph_breaks']} graph breaks, {result['warmup_seconds']:.0f} s of warm-up"
        )
    lines = [head, f"{'setting':<26}{'steps/s':>9}{'tokens/s':>11}{'peak GB':>9}{'speedup':>9}{'ideal':>8}{'ratio':>7}"]
    for name, row in result["settings"].items():
        peak = f"{row['peak_memory_gb']:.1f}" if row["peak_memory_gb"] else "n/a"
        lines.append(
            f"{name:<26}{row['steps_per_s']:>9.2f}{row['lm_tokens_per_s']:>11.0f}{peak:>9}"
            f"{row['speedup']:>9.2f}{row['flops_ideal_speedup']:>8.2f}{row['speedup_over_ideal']:>7.2f}"
        )
    lines.append(f"language model share of a full instruction-tuning step's FLOPs: {result['lm_share_of_flops']:.1%}")
    return "\n".join(lines)

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
from tqdm import tqdm
from transformers import LlavaConfig, LlavaForConditionalGeneration

import sts
from sts.adapters import get_adapter
from sts.cli.flops import Shapes, train_step_flops
from sts.cli.presets import preset_config

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
) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config, text_tokens = preset_config(preset, layers)
    config.text_config._attn_implementation = config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: a 7B model's CPU init alone takes minutes
        model = LlavaForConditionalGeneration(config).to(dtype=dtype).train()
    shapes = Shapes.of(config)
    inputs = {stage: synthetic_batch(config, batch, text, device) for stage, text in text_tokens.items()}
    chosen = [s for s in SETTINGS if settings is None or s.name in settings]
    records = {s.name: Record() for s in chosen}
    adapter = get_adapter(model)

    def one_step(setting: Setting, step: int, record: Record | None):
        adapter.set_trainable(setting.parts)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=1e-6)  # stateless: the same memory for every setting
        if setting.sts is not None:
            sts.apply_sts(model, setting.sts)
            sts.set_progress(model, step, steps)  # LDS sees a whole run's schedule over the timed steps
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        batch_inputs = inputs[setting.stage]
        with Timer(device) as timer:
            model(**batch_inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        length, layers_run = batch_inputs["input_ids"].shape[1], shapes.text_layers
        if setting.sts is not None:
            stats = sts.step_stats(model)
            length, layers_run = stats["lm_seq_len"], shapes.text_layers - len(stats.get("skipped_layers", []))
            sts.remove_sts(model)
        if record is not None:
            record.times.append(timer.seconds)
            trains = {k: v == "full" for k, v in setting.parts.items()}
            record.flops.append(sum(train_step_flops(shapes, batch, length, batch, trains, layers_run).values()))
            record.lm_tokens.append(batch * length)
            if device.type == "cuda":
                record.peak_bytes = max(record.peak_bytes, torch.cuda.max_memory_allocated())

    for step in range(warmup):
        for setting in chosen:
            one_step(setting, step, None)
    for step in tqdm(range(steps), desc=f"bench {preset}"):
        for setting in chosen:
            one_step(setting, step, records[setting.name])

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
        "lm_share_of_flops": lm_share(shapes, batch, inputs["instruct"]["input_ids"].shape[1]),
        "settings": rows,
    }
    print(format_bench(result))
    if out:
        path = Path(out) / f"bench-{preset}-b{batch}-{result['device'].replace(' ', '_').replace(',', '')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"recorded {path}")
    return result


def lm_share(shapes: Shapes, batch: int, length: int) -> float:
    """The language model's share of a full-token instruction-tuning step's FLOPs."""
    parts = train_step_flops(shapes, batch, length, batch, {k: v == "full" for k, v in INSTRUCT.items()})
    return parts["language_model"] / sum(parts.values())


def format_bench(result: dict) -> str:
    head = (
        f"sts bench {result['preset']} on {result['device']} ({result['dtype']}, batch {result['batch']}, "
        f"{result['sequence_tokens']['align']}/{result['sequence_tokens']['instruct']} tokens in align/instruct, "
        f"{result['decoder_layers']} decoder layers, {result['date']})"
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

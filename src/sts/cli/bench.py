"""`sts bench`: training throughput at realistic shapes with random weights (no hub).

Every setting is timed in one process, interleaved round by round, so that drift of the
machine hits them alike; each round's batch is the same for every setting. A step is forward,
backward and the optimizer step. The baseline of a stage is its fastest dense setting: the
plain padded batch, or packed (padding-free, `sts.pack` with nothing else enabled) where the
attention kernel skips what crosses samples (FlashAttention's varlen, FlexAttention's block
mask); STS settings pack there too. Speedup is baseline time / setting time; the FLOPs-ideal
speedup comes from `sts.cli.flops` with the real tokens of each sample (padding is no work)
and the layers each step ran, and their ratio says how close to ideal a setting is.
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
from transformers import AutoModelForImageTextToText
from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

import sts
from sts.adapters import get_adapter
from sts.cli.flops import Shapes, sample_deep_segments, samples_step_flops
from sts.cli.presets import preset as load_preset
from sts.cli.recipes import ConfigError
from sts.cli.synthetic import ImageLayout, draw_samples, real_lengths, synthetic_batch, visual_tokens
from sts.compat import set_activation_checkpointing
from sts.pack import VARLEN_KERNELS

ALIGN = {"vision_tower": "frozen", "projector": "full", "language_model": "frozen"}
INSTRUCT = {"vision_tower": "frozen", "projector": "full", "language_model": "full"}


@dataclass
class Setting:
    name: str
    stage: str  # "align" (projector trains) or "instruct" (projector and language model train)
    sts: dict | None  # None: the unpatched model
    dense: bool = False  # a candidate for its stage's baseline
    packs: bool = True  # packed where the bench packs (deep cuts need padded batches: never)

    @property
    def parts(self) -> dict:
        return ALIGN if self.stage == "align" else INSTRUCT

    @property
    def packed_dense(self) -> bool:
        """The dense baseline packed by STS with nothing else enabled: only where the bench packs."""
        return self.dense and self.sts is not None

    @property
    def overhead(self) -> bool:
        """STS attached with nothing enabled: what attaching alone costs, against the plain model."""
        return self.sts == {} and not self.dense

    @property
    def deep_cuts(self) -> list:
        return (self.sts or {}).get("vtc", {}).get("deep_cuts", [])


POOL = {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True}
TILES = {**POOL, "tile_keep_ratio": 0.0625}
SETTINGS = [
    Setting("align", "align", None, dense=True),
    Setting("align+packed", "align", {}, dense=True),
    Setting("align+vtc0.25", "align", {"vtc": {"strategy": "uniform", "keep_ratio": 0.25}}),
    Setting("align+pool0.0625", "align", {"vtc": {**POOL, "keep_ratio": 0.0625}}),  # sts-max's: 4x4 windows
    # sts-tiles' (anyres, both stages): 2x2 windows of the base view, 4x4 of the tiles
    Setting("align+tiles", "align", {"vtc": TILES}),
    Setting("instruct", "instruct", None, dense=True),
    Setting("instruct+packed", "instruct", {}, dense=True),
    Setting("instruct+lds0.5", "instruct", {"lds": {"alpha": 0.5, "epsilon": 0.5}}),
    Setting("instruct+pool0.25", "instruct", {"vtc": POOL}),  # sts-max's: 2x2 windows, proportional attention
    Setting("instruct+uniform0.25", "instruct", {"vtc": {"strategy": "uniform", "keep_ratio": 0.25}}),
    Setting("instruct+pool0.25+lds0.5", "instruct", {"vtc": POOL, "lds": {"alpha": 0.5, "epsilon": 0.5}}),
    # deep cuts (padded batches only): from a third of the decoder on, a quarter of the tokens it received
    Setting("instruct+pool0.25+deep", "instruct", {"vtc": {**POOL, "deep_cuts": [[0.34, 0.25]]}}, packs=False),
    Setting("instruct+tiles", "instruct", {"vtc": TILES}),
    # and from half the decoder on, half of them
    Setting("instruct+tiles+deep", "instruct", {"vtc": {**TILES, "deep_cuts": [[0.5, 0.5]]}}, packs=False),
    Setting("instruct+sts-off", "instruct", {}, packs=False),
]


def fastest_attention() -> str:
    return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"


FLASH_KERNELS = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}


def packs_well(attention: str) -> bool:
    """Whether the kernel skips the work across packed samples (else packing would cost attention)."""
    return attention in VARLEN_KERNELS or attention == "flex_attention"


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


@dataclass
class Round:
    """One round's batch of a stage: the inputs, and each sample's real and visual tokens."""

    inputs: dict
    lengths: list[int]
    visual: list[int]
    tower_images: int


GROUP = 50  # batches in a mega-batch sorted by length, as transformers' LengthGroupedSampler groups them


def build_rounds(layout: ImageLayout, stage: str, mean_text: int, batch: int, count: int, lengths: str, device):
    """`count` rounds' batches: `fixed` lengths (one batch serves every round), `sampled` ones, or
    `grouped`: sampled, then each batch drawn from a mega-batch sorted by length, as a padded
    training groups them (LLaVA's `group_by_modality_length`) to waste less on padding."""
    generator = torch.Generator().manual_seed(0 if stage == "align" else 1)
    if lengths == "fixed":
        batches = [draw_samples(stage, mean_text, batch, False, generator)]
    elif lengths == "sampled":
        batches = [draw_samples(stage, mean_text, batch, True, generator) for _ in range(count)]
    else:
        pool = draw_samples(stage, mean_text, GROUP * batch, True, generator)
        pool.sort(key=lambda sample: sample.text + layout.tokens * sample.image)
        chosen = torch.randperm(GROUP, generator=generator)[:count].tolist()
        batches = [pool[i * batch : (i + 1) * batch] for i in chosen]
    rounds = []
    for samples in batches:
        inputs = {k: v.to(device) for k, v in synthetic_batch(layout, samples, generator).items()}
        images = sum(sample.image for sample in samples)
        rounds.append(
            Round(inputs, real_lengths(layout, samples), visual_tokens(layout, samples), images * layout.tower_images)
        )
    return rounds


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
    lengths: str = "grouped",
    attention: str | None = None,
    packing: str = "auto",
    profile: bool = False,
) -> dict:
    """Time every setting (see the module's docstring); `optimizer` adamw (fused on a GPU) or sgd
    (stateless, as the records before 2026-11-28); `checkpointing`: activations checkpointed in
    instruction tuning, as the shipped recipes do; `lengths` fixed, sampled or grouped (`build_rounds`);
    `attention` a transformers kernel (default: FlashAttention-2 where installed, else SDPA);
    `packing` on, off or auto (on where the kernel skips what crosses samples); `profile`: one more
    step of each setting under `torch.profiler`, untimed, recorded as its busiest operations."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unknown = sorted(set(settings or []) - {s.name for s in SETTINGS})
    if unknown:
        raise ConfigError(
            f"--settings: no setting {', '.join(unknown)}; there are {', '.join(s.name for s in SETTINGS)}"
        )
    attention = attention or fastest_attention()
    if attention in FLASH_KERNELS and not FLASH_KERNELS[attention]():
        raise ConfigError(f"--attention {attention}: its package is not installed here, or it needs a GPU")
    packed = packing == "on" or (packing == "auto" and packs_well(attention))
    chosen = [s for s in SETTINGS if (settings is None or s.name in settings) and (packed or not s.packed_dense)]
    spec = load_preset(preset, layers)
    config = spec.config
    config.get_text_config().use_cache = False  # training keeps no KV cache (a compiled layer would guard on it)
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: a 7B model's CPU init alone takes minutes
        model = AutoModelForImageTextToText.from_config(config, attn_implementation=attention)
    model = model.to(dtype=dtype).train()
    shapes, layout = Shapes.of(config), ImageLayout(config, spec.image)
    rounds = {
        stage: build_rounds(layout, stage, text, batch, warmup + steps, lengths, device)
        for stage, text in spec.text_tokens.items()
    }
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
            sts.apply_sts(model, {**setting.sts, "pack": packed and setting.packs})
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
        stage_rounds = rounds[setting.stage]
        this = stage_rounds[(step + warmup) % len(stage_rounds)]
        with Timer(device) as timer:
            runner(**this.inputs).loss.backward()
            stepper.step()
            stepper.zero_grad(set_to_none=True)
        if step < 0:  # warm-up
            return timer.seconds
        kept, skipped = 1.0, []
        if setting.sts is not None:
            stats = sts.step_stats(model)
            kept = stats["visual_tokens_kept"] / stats["visual_tokens_in"] if stats["visual_tokens_in"] else 1.0
            skipped = stats.get("skipped_layers", [])
        # every image has the same size, so each keeps the same share of its visual tokens
        visual = [round(v * kept) for v in this.visual]
        lengths = [n - v + k for n, v, k in zip(this.lengths, this.visual, visual)]
        deep = [
            sample_deep_segments(setting.deep_cuts, shapes.text_layers, skipped, n - k, k)
            for n, k in zip(lengths, visual)
        ]
        trains = {k: v == "full" for k, v in setting.parts.items()}
        layers_run = shapes.text_layers - len(skipped)
        record.times.append(timer.seconds)
        record.flops.append(
            sum(samples_step_flops(shapes, lengths, this.tower_images, trains, layers_run, deep).values())
        )
        record.lm_tokens.append(sum(lengths))
        if device.type == "cuda":
            record.peak_bytes = max(record.peak_bytes, torch.cuda.max_memory_allocated())
        return timer.seconds

    # Steps -warmup..-1 warm up, 0..steps-1 are timed. A stage's settings are interleaved round by round,
    # so that drift hits them alike; the stages run one after the other, so that no setting pays for the
    # allocator re-arranging its cache from one stage's shapes to the other's (on a GPU at 7B shapes, the
    # first setting after each switch did). A whole-model compile keeps one setting's STS attached from
    # its first call (it never sees hooks added later), so there the settings run one after another,
    # each compiled afresh.
    profiles = {}

    def profile_last(setting: Setting, stepper: torch.optim.Optimizer) -> None:
        """The last timed step again, under the profiler (the skipper at the run's end, not at zero)."""
        profiles[setting.name] = profiled_step(lambda: one_step(setting, stepper, steps - 1, Record()), device)

    counters.clear()
    warmup_seconds = 0.0
    if compile == "whole":
        for setting in tqdm(chosen, desc=f"bench {preset} (compiled whole)"):
            torch._dynamo.reset()
            stepper = train_as(setting)
            for step in range(-warmup, steps):
                seconds = one_step(setting, stepper, step, records[setting.name])
                warmup_seconds += seconds if step < 0 else 0.0
            if profile:  # while its graph is still the compiled one: later, the profile would time compiling
                profile_last(setting, stepper)
            sts.remove_sts(model)  # a no-op for an unpatched setting
    else:
        for stage in ("align", "instruct"):
            in_stage = [setting for setting in chosen if setting.stage == stage]
            for step in tqdm(range(-warmup, steps) if in_stage else [], desc=f"bench {preset} {stage}"):
                for setting in in_stage:
                    seconds = one_step(setting, train_as(setting), step, records[setting.name])
                    warmup_seconds += seconds if step < 0 else 0.0
                    sts.remove_sts(model)  # a no-op for an unpatched setting
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next stage starts from a clean cache
        for setting in chosen if profile else []:
            profile_last(setting, train_as(setting))
            sts.remove_sts(model)

    seconds = {name: statistics.mean(record.times) for name, record in records.items()}
    baselines = {}
    for setting in chosen:
        if setting.dense:
            current = baselines.get(setting.stage)
            baselines[setting.stage] = (
                setting.name if current is None or seconds[setting.name] < seconds[current] else current
            )
    rows = {}
    for setting in chosen:
        record = records[setting.name]
        against = setting.stage if setting.overhead and setting.stage in records else baselines.get(setting.stage)
        base = records[against] if against else record
        speedup = statistics.mean(base.times) / seconds[setting.name]
        ideal = statistics.mean(base.flops) / statistics.mean(record.flops)
        rows[setting.name] = {
            "against": against or setting.name,
            "packed": packed and setting.packs and setting.sts is not None,
            "steps_per_s": 1 / seconds[setting.name],
            "samples_per_s": batch / seconds[setting.name],
            "lm_tokens_per_s": statistics.mean(record.lm_tokens) / seconds[setting.name],
            "tflops_per_step": statistics.mean(record.flops) / 1e12,
            "peak_memory_gb": record.peak_bytes / 2**30 if record.peak_bytes else None,
            "speedup": speedup,
            "flops_ideal_speedup": ideal,
            "speedup_over_ideal": speedup / ideal,
            "step_seconds": record.times,  # each timed step: an outlier shows here, not in the mean
            **({"profile": profiles[setting.name]} if profile else {}),
        }
    instruct = rounds["instruct"][0]
    result = {
        "preset": preset,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
        "date": datetime.date.today().isoformat(),
        "dtype": str(dtype).replace("torch.", ""),
        "attention": attention,
        "packing": packed,
        "batch": batch,
        "decoder_layers": shapes.text_layers,
        "lengths": lengths,
        "visual_tokens_per_image": layout.tokens,
        "mean_sample_tokens": {
            stage: statistics.mean(n for r in stage_rounds for n in r.lengths) for stage, stage_rounds in rounds.items()
        },
        "sample_tokens": {stage: [r.lengths for r in stage_rounds] for stage, stage_rounds in rounds.items()},
        "steps": steps,
        "warmup": warmup,
        "compile": compile,
        "optimizer": optimizer,
        "activation_checkpointing": "instruct" if checkpointing else "none",
        "warmup_seconds": warmup_seconds,  # compiling happens here
        "compiled_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "lm_share_of_flops": lm_share(shapes, instruct),
        "baselines": baselines,
        "settings": rows,
    }
    print(format_bench(result))
    if out:
        compiled_as = "" if compile == "none" else f"-compile-{compile}"
        device_name = result["device"].replace(" ", "_").replace(",", "")
        packed_as = "-packed" if packed else ""
        path = Path(out) / f"bench-{preset}-b{batch}-{lengths}-{attention}{packed_as}{compiled_as}-{device_name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"recorded {path}")
    return result


def profiled_step(step, device, top: int = 12) -> dict:
    """One step under `torch.profiler`: its wall time, the time the device was busy (the sum of every
    operator's own device time; on a CPU, of its own CPU time) and the `top` busiest operators. A
    step much longer than its busy time waits on the host."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        seconds = step()
    # operators (host-side events); their kernels' rows would count the same device time twice
    events = [e for e in profiler.key_averages() if e.device_type == DeviceType.CPU]
    own = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busiest = sorted(events, key=lambda e: getattr(e, own), reverse=True)[:top]
    return {
        "wall_ms": seconds * 1000,
        "busy_ms": sum(getattr(e, own) for e in events) / 1000,
        "top": [{"name": e.key, "ms": getattr(e, own) / 1000, "calls": e.count} for e in busiest],
    }


def compiled(model, mode: str):
    """What the bench calls: the model itself, `torch.compile(model)`, or the model with each repeated
    block compiled in place (`sts.compile_layers`)."""
    torch._dynamo.config.recompile_limit = 64  # each setting trains other parts, at other lengths: its own graphs
    if mode == "whole":
        return torch.compile(model)
    return sts.compile_layers(model) if mode == "regional" else model


def lm_share(shapes: Shapes, first: Round) -> float:
    """The language model's share of a full-token instruction-tuning step's FLOPs."""
    trains = {k: v == "full" for k, v in INSTRUCT.items()}
    parts = samples_step_flops(shapes, first.lengths, first.tower_images, trains)
    return parts["language_model"] / sum(parts.values())


def format_bench(result: dict) -> str:
    tokens = result["mean_sample_tokens"]
    head = (
        f"sts bench {result['preset']} on {result['device']} ({result['dtype']}, {result['attention']}, batch "
        f"{result['batch']}, {result['lengths']} lengths: {tokens['align']:.0f}/{tokens['instruct']:.0f} tokens a "
        f"sample in align/instruct, {result['decoder_layers']} decoder layers, {result['optimizer']}, activation "
        f"checkpointing: {result['activation_checkpointing']}, packing: {'on' if result['packing'] else 'off'}, "
        f"{result['date']})"
    )
    if result["compile"] != "none":
        head += (
            f"\ncompiled ({result['compile']}): {result['compiled_graphs']} graphs, "
            f"{result['graph_breaks']} graph breaks, {result['warmup_seconds']:.0f} s of warm-up"
        )
    lines = [
        head,
        f"{'setting':<26}{'steps/s':>9}{'tokens/s':>11}{'peak GB':>9}{'speedup':>9}{'ideal':>8}{'ratio':>7}  against",
    ]
    for name, row in result["settings"].items():
        peak = f"{row['peak_memory_gb']:.1f}" if row["peak_memory_gb"] else "n/a"
        lines.append(
            f"{name:<26}{row['steps_per_s']:>9.2f}{row['lm_tokens_per_s']:>11.0f}{peak:>9}"
            f"{row['speedup']:>9.2f}{row['flops_ideal_speedup']:>8.2f}{row['speedup_over_ideal']:>7.2f}"
            f"  {row['against']}"
        )
    lines.append(f"language model share of a full instruction-tuning step's FLOPs: {result['lm_share_of_flops']:.1%}")
    for name, row in result["settings"].items():
        if "profile" in row:
            step = row["profile"]
            busiest = ", ".join(f"{op['name']} {op['ms']:.1f}" for op in step["top"][:5])
            lines.append(f"profiled {name}: {step['wall_ms']:.0f} ms, busy {step['busy_ms']:.0f} ms; {busiest}")
    return "\n".join(lines)

"""`sts demo`: the same tiny LLaVA, from the same weights, on the same data, trained by
each recipe for each training seed, then evaluated with the full model; one table (means
over seeds with their min and max), two plots, one JSON.

Presets (`--preset`), each a scale model of a 7B model's training (tests/test_flops.py):
- `llava-1.5`: one 64 px view, 64 visual tokens an image: LLaVA-1.5-7B's;
- `llava-next`: the same model and scenes in LLaVA-NeXT's anyres form: 128 px images as a base
  view and 2 x 2 tiles with newlines, 336 visual tokens an image: LLaVA-NeXT-7B's.

Writes DIR/results.json, DIR/loss.png and DIR/accuracy.png.

Recipes (overrides of the shipped `demo` recipe):
- `baseline`: no STS;
- `sts`: the paper's design: compressor in alignment, skipper in instruction tuning;
- `sts-max`: pushed further where it pays on this benchmark (see RECIPES);
- `sts-full-tail`: `sts-max` with alignment's last tenth on full tokens, the steadier over seeds;
- `sts-tiles-tail` (for the llava-next preset): both views pooled to one grid in both stages,
  alignment ending on full tokens, instruction tuning distilling into full-token steps;
- `sts-tiles-merged` (the llava-next preset's second): the same, with one newline for each row of
  pooled tile tokens instead of one for each row of the tiles;
- `sts-tiles-base-tail` (the llava-next preset's first): the same, with alignment's tail reading
  only the base view whole, the tiles still pooled;
- `baseline-equal-time`: no STS, each stage cut to as many steps as fit in the time the
  fastest STS recipe took for it on the same seed: does sparse training beat training less?
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from sts.cli.data.synth import IMAGE_SIZE, generate
from sts.cli.evaluate import evaluate
from sts.cli.flops import recipe_flops
from sts.cli.presets import LLAVA_15_DATA, LLAVA_NEXT_DATA, image_geometry, preset
from sts.cli.recipes import ConfigError, RecipeConfig, load_recipe
from sts.cli.train import run_recipe

STS_MAX = [
    # Alignment on 4x4 windows (a sixteenth of the tokens): the frozen language model reads
    # the caption off window means, and every token still trains the projector.
    "vtc.keep_ratio=0.0625",
    # The compressor in instruction tuning too: 2x2 pooling keeps one token per cell of the
    # image, and proportional attention counts each as the four it stands for, so what the
    # language model learns to count and compare still holds on full tokens. The skipper
    # beside it cost more accuracy than it saved time (README).
    "stages.1.vtc={strategy: pool, keep_ratio: 0.25, proportional_attention: true}",
    "lds=null",
]
# Anyres (the llava-next preset): both stages on 2x2 windows of the base view and 4x4 windows of
# the tiles, which show the same image at twice the resolution; so both views come down to the
# same grid, each token a window of the image as large as one of `sts-max`'s instruction tokens.
STS_TILES = [
    "vtc.tile_keep_ratio=0.0625",
    "stages.1.vtc={strategy: pool, keep_ratio: 0.25, tile_keep_ratio: 0.0625, proportional_attention: true}",
    "lds=null",
]
# A tenth of instruction tuning's steps on full tokens, each distilling the compressed forward's
# answers (DualSpeed's slow mode), which carries counting learnt on pooled tokens over to full ones.
INSTRUCT_SELF_DISTILLATION = ["stages.1.vtc.full_tokens_random_fraction=0.1", "stages.1.vtc.self_distillation=1.0"]
# `sts-tiles` without proportional attention (a pooled tile token weighing 16 to the base view's 4
# kept the side of the image, read off the base view, at chance; without it, position is right on
# two seeds of three), with instruction self-distillation (README).
STS_TILES_DISTIL = [
    *STS_TILES,
    "vtc.proportional_attention=false",
    "stages.1.vtc.proportional_attention=false",
    *INSTRUCT_SELF_DISTILLATION,
]
# Proportional attention kept in alignment, where the projector learns to count with it, and
# alignment's last tenth on full tokens, where it learns the side of the image again; instruction
# tuning without it, with self-distillation. Three seeds: retention 1.00, no seed below 0.98 (README).
STS_TILES_TAIL = [
    *STS_TILES,
    "vtc.full_tokens_final_fraction=0.1",
    "stages.1.vtc.proportional_attention=false",
    *INSTRUCT_SELF_DISTILLATION,
]
# `sts-tiles-tail` with the tiles' newlines merged as their rows are pooled: 4 x 4 windows of the 16-row
# tile grid keep 4 newlines, not 16, which were a third of a compressed forward's visual tokens. Three
# seeds: retention 1.010 (no seed below 0.989), 3.48x measured against sts-tiles-tail's 3.42x (README).
STS_TILES_MERGED = [*STS_TILES_TAIL, "vtc.merge_newlines=true", "stages.1.vtc.merge_newlines=true"]
# `sts-tiles-merged` with alignment's last tenth reading the base view whole and the tiles still pooled,
# at a third of a full-token step's cost: the side of the image, which that tail is for, is read off the
# base view. Three seeds: retention 1.007 (no seed below 0.985); 4.12x and 3.97x measured in two runs (README).
STS_TILES_BASE_TAIL = [*STS_TILES_MERGED, "vtc.full_tokens_final_fraction=0.0", "vtc.keep_ratio_schedule=[[0.9, 1.0]]"]
RECIPES = {
    "baseline": ["vtc=null", "lds=null"],
    "sts": [],
    "sts-max": STS_MAX,
    # `sts-max` with alignment's last tenth of steps on full tokens: a projector aligned only on means
    # of 16 tokens does not learn where things are on some seeds (position questions at 0.57); its
    # last steps on the tokens it will see at inference bring them back. Five seeds: retention 0.981
    # (0.963-1.002) against `sts-max`'s 0.970 (0.909-0.998), for 2.40x FLOPs-ideal against 2.55x (README).
    "sts-full-tail": [*STS_MAX, "vtc.full_tokens_final_fraction=0.1"],
    # `sts-max` with a deep cut in instruction tuning: from a third of the decoder's depth on, a quarter
    # of the pooled tokens (evenly spaced). Five seeds kept `sts-max`'s accuracy (README); the deep
    # layers, most of a step's work, read about 30 tokens a sample here instead of `sts-max`'s 42.
    "sts-deep": [*STS_MAX, "stages.1.vtc.deep_cuts=[[0.34, 0.25]]"],
    "sts-tiles": STS_TILES,
    "sts-tiles-distil": STS_TILES_DISTIL,
    # The same with a fifth of instruction tuning's steps on full tokens: over three seeds, the same
    # accuracy (0.893 against 0.892) for 22% more time (README); kept to show that trade.
    "sts-tiles-distil-20": [*STS_TILES_DISTIL, "stages.1.vtc.full_tokens_random_fraction=0.2"],
    "sts-tiles-tail": STS_TILES_TAIL,
    # The same with half the full-token instruction steps (5%): three seeds, 4.11x measured against
    # 3.60x, but retention 0.954 against 1.001: counting does not carry over (README).
    "sts-tiles-tail-5": [*STS_TILES_TAIL, "stages.1.vtc.full_tokens_random_fraction=0.05"],
    "sts-tiles-merged": STS_TILES_MERGED,
    "sts-tiles-base-tail": STS_TILES_BASE_TAIL,
}
EQUAL_TIME = "baseline-equal-time"


@dataclass(frozen=True)
class DemoPreset:
    """What the demo trains: overrides of every recipe, and the synthetic images' size."""

    description: str
    overrides: tuple[str, ...] = ()
    image_size: int = IMAGE_SIZE
    recipes: tuple[str, ...] = ("baseline", "sts", "sts-full-tail")  # what `sts demo` runs by default


PRESETS = {
    "llava-1.5": DemoPreset("the tiny LLaVA: 64 visual tokens an image; a scale model of LLaVA-1.5-7B's training"),
    "llava-next": DemoPreset(
        "the tiny model in LLaVA-NeXT's anyres form: 336 visual tokens an image; a scale model of LLaVA-NeXT-7B's",
        # 200 alignment steps to 400: alignment's share of the FLOPs as in LLaVA-NeXT-7B's training
        # (558K captions, then 1M conversations), 27%. Twice the LLaVA-1.5 preset's instruction
        # steps: on the LLaVA form's base, with half of each, the dense model reached 0.69 (three
        # seeds), with these 0.84; on the anyres form's own base (2026-11-29), 0.95 (README).
        ("model.family=llava-next", "stages.0.max_steps=200", "stages.1.max_steps=400"),
        image_size=2 * IMAGE_SIZE,
        recipes=("baseline", "sts-tiles-base-tail", "sts-tiles-merged"),
    ),
}


def demo_preset(name: str) -> DemoPreset:
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: not one of {sorted(PRESETS)}")
    return PRESETS[name]


def select_recipes(specs: list[str] | None, preset: str = "llava-1.5") -> dict[str, list[str]]:
    """`--recipe` values -> recipes to run (none: the preset's). `NAME` picks a shipped one,
    `NAME=key=value ...` defines a variant of the demo recipe; `baseline` always runs first, as
    every comparison needs it."""
    if not specs:
        return {name: RECIPES[name] for name in demo_preset(preset).recipes}
    recipes = {"baseline": RECIPES["baseline"]}
    for spec in specs:
        name, _, overrides = spec.partition("=")
        if overrides:
            recipes[name] = overrides.split()
        elif name in RECIPES:
            recipes[name] = RECIPES[name]
        else:
            raise ConfigError(f"--recipe {name!r}: not one of {sorted(RECIPES)}; define one as NAME='key=value ...'")
    return recipes


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def summarise(trained: dict, scored: dict) -> dict:
    return {
        "accuracy": scored["accuracy"],
        "per_type": scored["per_type"],
        "train_seconds": trained["train_seconds"],
        "flops": sum(s["flops"] for s in trained["stages"]),
        "model_dir": trained["model_dir"],
        "stages": trained["stages"],
    }


def llava_15_flops(recipe: RecipeConfig, fractions: list[float]) -> list[float]:
    """Each stage's FLOPs if `recipe` trained LLaVA-1.5-7B (CLIP-L/336: 24 x 24 visual tokens,
    32 decoder layers of Vicuna-7B's width) on LLaVA-1.5's data."""
    return recipe_flops(recipe, preset("llava-1.5-7b").config, LLAVA_15_DATA, fractions)


def llava_next_flops(recipe: RecipeConfig, fractions: list[float]) -> list[float]:
    """Each stage's FLOPs if `recipe` trained LLaVA-NeXT-7B on 672 x 672 images (a base view and
    2 x 2 tiles: 2,928 visual tokens, 5 images through the tower) on its data (`presets`)."""
    spec = preset("llava-next-7b")
    return recipe_flops(recipe, spec.config, LLAVA_NEXT_DATA, fractions, image_geometry(spec.config, spec.image))


def compare(runs: dict) -> None:
    """Add speedup and retention against the baseline (of the same seed) to every run."""
    base = runs["baseline"]
    for run in runs.values():
        run["speedup"] = base["train_seconds"] / run["train_seconds"]
        run["flops_ideal_speedup"] = base["flops"] / run["flops"]
        run["llava_15_ideal_speedup"] = sum(base["llava_15_flops"]) / sum(run["llava_15_flops"])
        run["llava_next_ideal_speedup"] = sum(base["llava_next_flops"]) / sum(run["llava_next_flops"])
        run["retention"] = run["accuracy"] / base["accuracy"] if base["accuracy"] else None


def equal_time_steps(runs: dict) -> list[int]:
    """Per stage, the baseline's steps scaled to the time the fastest STS recipe took for it."""
    fastest = min((run for name, run in runs.items() if name != "baseline"), key=lambda run: run["train_seconds"])
    return [
        max(1, round(base["steps"] * fast["seconds"] / base["seconds"]))
        for base, fast in zip(runs["baseline"]["stages"], fastest["stages"])
    ]


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Recipe -> the mean over seeds at `accuracy`, `train_seconds`, ... (what one seed's run
    has), `spread` of accuracy, time, speedup and retention, and every seed's run at `seeds`."""
    recipes = list(next(iter(per_seed.values())))
    runs = {}
    for name in recipes:
        seeds = {seed: runs_of_seed[name] for seed, runs_of_seed in per_seed.items()}
        first = next(iter(seeds.values()))

        def average(value) -> float:
            return statistics.mean(value(run) for run in seeds.values())

        mean = {
            key: average(lambda run: run[key])
            for key in (
                "accuracy",
                "train_seconds",
                "flops",
                "speedup",
                "flops_ideal_speedup",
                "llava_15_ideal_speedup",
                "llava_next_ideal_speedup",
            )
        }
        mean["per_type"] = {kind: average(lambda run: run["per_type"][kind]) for kind in first["per_type"]}
        mean["stages"] = [
            {
                key: average(lambda run: run["stages"][i][key])
                for key in ("seconds", "samples", "samples_per_s", "flops", "peak_memory_gb")
            }
            | {"name": stage["name"]}
            for i, stage in enumerate(first["stages"])
        ]
        retentions = [run["retention"] for run in seeds.values() if run["retention"] is not None]
        mean["spread"] = {
            key: spread([run[key] for run in seeds.values()]) for key in ("accuracy", "train_seconds", "speedup")
        }
        mean["spread"]["retention"] = spread(retentions) if retentions else None
        mean["seeds"] = {str(seed): run for seed, run in seeds.items()}
        runs[name] = mean
    base = runs["baseline"]["accuracy"]
    for run in runs.values():
        run["retention"] = run["accuracy"] / base if base else None  # of the means
    return runs


def format_results(results: dict) -> str:
    runs, seeds = results["runs"], results["seeds"]
    lines = [
        f"sts demo --preset {results['preset']} on {results['machine']}, {results['date']}; training seeds {seeds}"
        + (" (means over seeds; min-max in the last columns)" if len(seeds) > 1 else ""),
        f"{'recipe':<20}{'stage':<10}{'time s':>8}{'samples/s':>11}{'TFLOPs':>9}{'peak GB':>9}",
    ]
    for name, run in runs.items():
        for stage in run["stages"]:
            lines.append(
                f"{name:<20}{stage['name']:<10}{stage['seconds']:>8.1f}{stage['samples_per_s']:>11.1f}"
                f"{stage['flops'] / 1e12:>9.2f}{stage['peak_memory_gb']:>9.2f}"
            )
        total_samples = sum(s["samples"] for s in run["stages"])
        lines.append(
            f"{name:<20}{'total':<10}{run['train_seconds']:>8.1f}"
            f"{total_samples / run['train_seconds']:>11.1f}{run['flops'] / 1e12:>9.2f}"
        )
    types = list(next(iter(runs.values()))["per_type"])
    lines.append("")
    lines.append(
        f"{'recipe':<20}{'accuracy':>9}"
        + "".join(f"{t:>10}" for t in types)
        + f"{'speedup':>9}{'ideal':>7}{'7B ideal':>9}{'NeXT ideal':>11}{'retention':>11}"
        + (f"{'accuracy min-max':>18}{'retention min-max':>19}" if len(seeds) > 1 else "")
    )
    for name, run in runs.items():
        retention = run["spread"]["retention"]
        lines.append(
            f"{name:<20}{run['accuracy']:>9.3f}"
            + "".join(f"{run['per_type'][t]:>10.3f}" for t in types)
            + f"{run['speedup']:>8.2f}x{run['flops_ideal_speedup']:>6.2f}x{run['llava_15_ideal_speedup']:>8.2f}x"
            + f"{run['llava_next_ideal_speedup']:>10.2f}x"
            + (f"{run['retention']:>11.3f}" if run["retention"] is not None else f"{'n/a':>11}")
            + (
                f"{run['spread']['accuracy']['min']:>11.3f}-{run['spread']['accuracy']['max']:.3f}"
                + (f"{retention['min']:>12.3f}-{retention['max']:.3f}" if retention else f"{'n/a':>18}")
                if len(seeds) > 1
                else ""
            )
        )
    base = runs["baseline"]["seeds"][str(seeds[0])]
    lines += [
        "",
        "ideal: FLOPs-ideal speedup here; 7B ideal: the same recipe's at LLaVA-1.5-7B shapes and LLaVA-1.5's "
        "data lengths; NeXT ideal: at LLaVA-NeXT-7B's (anyres, 2,928 visual tokens an image; sts.cli.flops).",
        f"alignment's share of the baseline's FLOPs: {base['stages'][0]['flops'] / base['flops']:.0%} here, "
        f"{base['llava_15_flops'][0] / sum(base['llava_15_flops']):.0%} in LLaVA-1.5-7B's training, "
        f"{base['llava_next_flops'][0] / sum(base['llava_next_flops']):.0%} in LLaVA-NeXT-7B's",
    ]
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    """loss.png: training loss against wall-clock time, every recipe, first seed; accuracy.png:
    accuracy per question type and overall, the mean over seeds with min-max error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, first = results["runs"], str(results["seeds"][0])
    caption = f"sts demo --preset {results['preset']}, {results['machine']}, {results['date']}"
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for name, run in runs.items():
        offset, times, values = 0.0, [], []
        for stage in run["seeds"][first]["stages"]:
            times += [offset + seconds for seconds, _, _ in stage["losses"]]
            values += [loss for _, _, loss in stage["losses"]]
            offset += stage["seconds"]
        axis.plot(times, values, label=f"{name} ({offset:.0f}s)")
    axis.set(
        xlabel="wall-clock training time (s)",
        ylabel="training loss",
        yscale="log",
        title=f"loss against time (align, then instruct), seed {first}\n{caption}",
    )
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "loss.png", dpi=110)
    plt.close(figure)

    types = list(next(iter(runs.values()))["per_type"]) + ["overall"]
    width = 0.8 / len(runs)
    figure, axis = plt.subplots(figsize=(8, 4.2))
    for i, (name, run) in enumerate(runs.items()):
        per_seed = [[seed["per_type"][t] for t in types[:-1]] + [seed["accuracy"]] for seed in run["seeds"].values()]
        means = [statistics.mean(column) for column in zip(*per_seed)]
        errors = [
            [m - min(c) for m, c in zip(means, zip(*per_seed))],
            [max(c) - m for m, c in zip(means, zip(*per_seed))],
        ]
        axis.bar([x + i * width for x in range(len(types))], means, width, yerr=errors, capsize=2, label=name)
    axis.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(types))], types)
    axis.set(
        ylim=(0, 1),
        ylabel="test accuracy (full model)",
        title=f"accuracy per question type, mean and min-max over seeds {results['seeds']}\n{caption}",
    )
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=110)
    plt.close(figure)


def run_demo(
    out: str | Path | None = None,
    train: int = 4000,
    test: int = 750,
    seed: int = 0,
    recipes: dict[str, list[str]] | None = None,
    extra: list[str] = (),
    seeds: list[int] = (0,),
    equal_time: bool = True,
    preset: str = "llava-1.5",
) -> dict:
    """Data from `seed`; every recipe (default: the preset's) trained with every training seed in
    `seeds` on `preset`'s model; with `equal_time`, the dense recipe cut to the fastest STS
    recipe's time too. `out` defaults to runs/demo (runs/demo-PRESET for another preset)."""
    shape = demo_preset(preset)
    out = Path(out or ("runs/demo" if preset == "llava-1.5" else f"runs/demo-{preset}"))
    recipes = recipes or select_recipes(None, preset)
    extra = [*shape.overrides, *extra]
    print(f"sts demo --preset {preset}: {shape.description}")
    data = generate(out / "data", train, test, seed, align=train, image_size=shape.image_size)
    per_seed = {}
    for training_seed in seeds:
        runs = {}

        def train_and_score(name: str, overrides: list[str]) -> None:
            print(f"\n=== recipe {name}, training seed {training_seed} ===")
            recipe = load_recipe(
                "demo",
                [
                    f"data.train={data['train']}",
                    f"stages.0.data.train={data['align']}",
                    f"output_dir={out / name / f'seed-{training_seed}'}",
                    "overwrite=true",  # a demo run starts over
                    f"seed={training_seed}",
                    *overrides,
                ],
            )
            trained = run_recipe(recipe)
            runs[name] = summarise(trained, evaluate(trained["model_dir"], data["test"]))
            dense = runs.get("baseline", runs[name])["stages"]  # the baseline runs first
            fractions = [stage["steps"] / full["steps"] for stage, full in zip(trained["stages"], dense)]
            runs[name]["llava_15_flops"] = llava_15_flops(recipe, fractions)
            runs[name]["llava_next_flops"] = llava_next_flops(recipe, fractions)

        for name, overrides in recipes.items():
            train_and_score(name, [*overrides, *extra])
        if equal_time and len(runs) > 1:
            cut = [f"stages.{i}.max_steps={steps}" for i, steps in enumerate(equal_time_steps(runs))]
            train_and_score(EQUAL_TIME, [*recipes["baseline"], *extra, *cut])
        compare(runs)
        per_seed[training_seed] = runs
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "preset": preset,
        "seeds": list(seeds),
        "runs": aggregate(per_seed),
    }
    plot(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + format_results(results))
    print(f"\nresults: {out / 'results.json'}; plots: {out / 'loss.png'}, {out / 'accuracy.png'}")
    if len(seeds) == 1:
        print(f"one training seed ({seeds[0]}): a single run is a draw; `sts demo --seeds 0,1,2` shows the spread")
    return results

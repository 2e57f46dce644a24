"""`sts demo`: the same tiny LLaVA, from the same weights, on the same data, trained by
each recipe, then evaluated with the full model; one table, two plots, one JSON.

Writes DIR/results.json, DIR/loss.png and DIR/accuracy.png.

Recipes (overrides of the shipped `demo` recipe):
- `baseline`: no STS;
- `sts`: the paper's design: compressor in alignment, skipper in instruction tuning;
- `sts-max`: pushed further where it pays on this benchmark (see RECIPES).
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import torch

from sts.config import ConfigError, load_recipe
from sts.data.synth import generate
from sts.evaluate import evaluate
from sts.train import run_recipe

RECIPES = {
    "baseline": ["vtc=null", "lds=null"],
    "sts": [],
    "sts-max": [
        # The compressor in instruction tuning too: 2x2 pooling keeps one token per cell of the
        # image, and proportional attention counts each as the four it stands for, so what the
        # language model learns to count and compare still holds on full tokens. The skipper
        # costs more accuracy than it saves time here (README: where the accuracy goes).
        "stages.1.vtc={strategy: pool, keep_ratio: 0.25, proportional_attention: true}",
        "lds=null",
    ],
}


def select_recipes(specs: list[str] | None) -> dict[str, list[str]]:
    """`--recipe` values -> recipes to run. `NAME` picks a shipped one, `NAME=key=value ...` defines
    a variant of the demo recipe; `baseline` always runs first, as every comparison needs it."""
    if not specs:
        return dict(RECIPES)
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


def compare(runs: dict) -> None:
    """Add speedup and retention against the baseline to every run."""
    base = runs["baseline"]
    for run in runs.values():
        run["speedup"] = base["train_seconds"] / run["train_seconds"]
        run["flops_ideal_speedup"] = base["flops"] / run["flops"]
        run["retention"] = run["accuracy"] / base["accuracy"] if base["accuracy"] else None


def format_results(results: dict) -> str:
    runs = results["runs"]
    lines = [f"sts demo on {results['machine']}, {results['date']}",
             f"{'recipe':<10}{'stage':<10}{'time s':>8}{'samples/s':>11}{'TFLOPs':>9}{'peak GB':>9}"]
    for name, run in runs.items():
        for stage in run["stages"]:
            lines.append(f"{name:<10}{stage['name']:<10}{stage['seconds']:>8.1f}{stage['samples_per_s']:>11.1f}"
                         f"{stage['flops'] / 1e12:>9.2f}{stage['peak_memory_gb']:>9.2f}")
        total_samples = sum(s["samples"] for s in run["stages"])
        lines.append(f"{name:<10}{'total':<10}{run['train_seconds']:>8.1f}"
                     f"{total_samples / run['train_seconds']:>11.1f}{run['flops'] / 1e12:>9.2f}")
    types = list(next(iter(runs.values()))["per_type"])
    lines.append("")
    lines.append(f"{'recipe':<10}{'accuracy':>9}" + "".join(f"{t:>10}" for t in types)
                 + f"{'speedup':>9}{'ideal':>7}{'retention':>11}")
    for name, run in runs.items():
        lines.append(f"{name:<10}{run['accuracy']:>9.3f}" + "".join(f"{run['per_type'][t]:>10.3f}" for t in types)
                     + f"{run['speedup']:>8.2f}x{run['flops_ideal_speedup']:>6.2f}x"
                     + (f"{run['retention']:>11.3f}" if run["retention"] is not None else f"{'n/a':>11}"))
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    """loss.png: training loss against wall-clock time; accuracy.png: accuracy per question type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    caption = f"sts demo, {results['machine']}, {results['date']}"
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for name, run in runs.items():
        offset, times, values = 0.0, [], []
        for stage in run["stages"]:
            times += [offset + seconds for seconds, _, _ in stage["losses"]]
            values += [loss for _, _, loss in stage["losses"]]
            offset += stage["seconds"]
        axis.plot(times, values, label=f"{name} ({run['train_seconds']:.0f}s)")
    axis.set(xlabel="wall-clock training time (s)", ylabel="training loss", yscale="log",
             title=f"loss against time (align, then instruct)\n{caption}")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "loss.png", dpi=110)
    plt.close(figure)

    types = list(next(iter(runs.values()))["per_type"]) + ["overall"]
    width = 0.8 / len(runs)
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for i, (name, run) in enumerate(runs.items()):
        values = [run["per_type"][t] for t in types[:-1]] + [run["accuracy"]]
        axis.bar([x + i * width for x in range(len(types))], values, width, label=name)
    axis.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(types))], types)
    axis.set(ylim=(0, 1), ylabel="test accuracy (full model)", title=f"accuracy per question type\n{caption}")
    axis.legend(loc="lower right")
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=110)
    plt.close(figure)


def run_demo(out: str | Path = "runs/demo", train: int = 4000, test: int = 300, seed: int = 0,
             recipes: dict[str, list[str]] = RECIPES, extra: list[str] = ()) -> dict:
    out = Path(out)
    data = generate(out / "data", train, test, seed)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "runs": {}}
    for name, overrides in recipes.items():
        print(f"\n=== recipe {name} ===")
        recipe = load_recipe("demo", [f"data.train={data['train']}", f"output_dir={out / name}",
                                      f"seed={seed}", *overrides, *extra])
        trained = run_recipe(recipe)
        results["runs"][name] = summarise(trained, evaluate(trained["model_dir"], data["test"]))
    compare(results["runs"])
    plot(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + format_results(results))
    print(f"\nresults: {out / 'results.json'}; plots: {out / 'loss.png'}, {out / 'accuracy.png'}")
    return results

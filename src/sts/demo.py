"""`sts demo`: synthetic data -> the demo recipe on the tiny LLaVA -> full-model evaluation.

Writes DIR/data, one folder per recipe, DIR/loss.png and DIR/results.json
(`runs.<recipe>.{accuracy, per_type, train_seconds, model_dir, stages}`).
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import torch

from sts.config import load_recipe
from sts.data.synth import generate
from sts.evaluate import evaluate, format_table
from sts.train import run_recipe

RECIPES = {"baseline": []}  # recipe name -> overrides of the shipped `demo` recipe


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def plot_losses(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        offset, times, losses = 0.0, [], []
        for stage in run["stages"]:
            times += [offset + seconds for seconds, _, _ in stage["losses"]]
            losses += [loss for _, _, loss in stage["losses"]]
            offset += stage["seconds"]
        axis.plot(times, losses, label=name)
    axis.set_xlabel("wall-clock training time (s)")
    axis.set_ylabel("training loss")
    axis.set_yscale("log")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_demo(out: str | Path = "runs/demo", train: int = 4000, test: int = 300, seed: int = 0) -> dict:
    out = Path(out)
    data = generate(out / "data", train, test, seed)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "runs": {}}
    for name, overrides in RECIPES.items():
        recipe = load_recipe("demo", [f"data.train={data['train']}", f"output_dir={out / name}",
                                      f"seed={seed}", *overrides])
        trained = run_recipe(recipe)
        scored = evaluate(trained["model_dir"], data["test"])
        results["runs"][name] = {
            "accuracy": scored["accuracy"],
            "per_type": scored["per_type"],
            "train_seconds": trained["train_seconds"],
            "model_dir": trained["model_dir"],
            "stages": trained["stages"],
        }
        print(f"\n{name}: trained in {trained['train_seconds']:.0f}s\n{format_table(scored)}\n")
    plot_losses(results["runs"], out / "loss.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / 'results.json'}, loss plot: {out / 'loss.png'}")
    return results

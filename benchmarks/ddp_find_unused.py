"""What DDP's `find_unused_parameters=True` costs a step, on steps where nothing is skipped.

The skipper leaves layers without gradients, which DDP must be told about
(`find_unused_parameters=True`: after every forward it walks the autograd graph to find the
parameters the step did not use). `sts train` turns it on only in stages where a layer can be
skipped. This measures the walk: two copies of the same model, one DDP-wrapped with it and one
without, trained on the same batches in alternating steps, no layer skipped.
Run: `torchrun --nproc_per_node 2 benchmarks/ddp_find_unused.py` (CPU: gloo; GPU: nccl).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sts.adapters import get_adapter
from sts.cli.models.tiny import build_model
from sts.cli.recipes import TinyModelConfig
from sts.patch import apply_sts

INSTRUCTION_TUNING = {"vision_tower": "frozen", "projector": "full", "language_model": "full"}
SHAPES = {  # the demo's model, and a deep thin one where the walk weighs most against the compute
    "demo": TinyModelConfig(),
    "deep-thin": TinyModelConfig(text_hidden=64, text_layers=32, text_heads=2, text_intermediate=128),
}


def timed_steps(models: dict, batch: dict, steps: int) -> dict[str, list[float]]:
    """Seconds of each step (forward, backward, all-reduce), the settings taking turns."""
    times = {name: [] for name in models}
    for _ in range(steps):
        for name, model in models.items():
            started = time.perf_counter()
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    results = {}
    for shape, sizes in SHAPES.items():
        models = {}
        for find_unused in (False, True):
            model = build_model(sizes, seed=0, base=False).to(device).train()
            get_adapter(model).set_trainable(INSTRUCTION_TUNING)
            apply_sts(model, {})
            models[f"find_unused={find_unused}"] = DistributedDataParallel(model, find_unused_parameters=find_unused)
        grid = sizes.image_size // sizes.patch_size
        text = 40
        image_token = models["find_unused=False"].module.config.image_token_id
        ids = torch.randint(3, 40, (args.batch, grid * grid + text), device=device)
        ids[ids == image_token] = 3
        ids[:, 1 : 1 + grid * grid] = image_token
        batch = {
            "input_ids": ids,
            "labels": ids.clone(),
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(args.batch, 3, sizes.image_size, sizes.image_size, device=device),
        }
        timed_steps(models, batch, 3)  # warm-up
        times = timed_steps(models, batch, args.steps)
        medians = {name: statistics.median(values) for name, values in times.items()}
        results[shape] = {
            "median_step_ms": {name: round(1000 * s, 2) for name, s in medians.items()},
            "cost": round(medians["find_unused=True"] / medians["find_unused=False"] - 1, 4),
        }
    if dist.get_rank() == 0:
        device_name = (
            torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s) a process"
        )
        record = {
            "date": datetime.date.today().isoformat(),
            "machine": device_name,
            "command": f"torchrun --nproc_per_node {dist.get_world_size()} benchmarks/ddp_find_unused.py "
            f"--steps {args.steps} --batch {args.batch}",
            "processes": dist.get_world_size(),
            "batch_per_process": args.batch,
            "results": results,
        }
        print(json.dumps(record, indent=2))
        name = "cuda" if torch.cuda.is_available() else "cpu"
        (Path(args.out) / f"ddp-find-unused-{name}-{record['date']}.json").write_text(json.dumps(record, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

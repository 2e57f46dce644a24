"""What a stage's training cost: FLOPs of the tokens and layers really run, time, loss, peak memory."""

from __future__ import annotations

import os
import threading
import time

import torch
from transformers import TrainerCallback

from sts.cli.flops import Shapes, deep_segments, train_step_flops
from sts.patch import drain_stats


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
            self.flops += self.forward_flops(forward, self.trains)
            if forward["teacher"] is not None:  # self-distillation's teacher: a forward, no backward
                self.flops += self.forward_flops(forward["teacher"], dict.fromkeys(self.trains, False))

    def forward_flops(self, forward: dict, trains: dict[str, bool]) -> float:
        """FLOPs of one forward's tokens and layers (and its backward, for what `trains`)."""
        layers_run = self.shapes.text_layers - len(forward["skipped_layers"])
        deep = deep_segments(self.shapes.text_layers, forward["skipped_layers"], forward["deep_seq_lens"])
        return sum(
            train_step_flops(
                self.shapes,
                forward["batch_size"],
                forward["lm_seq_len"],
                forward["tower_images"],
                trains,
                layers_run,
                deep,
            ).values()
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.points.append((time.perf_counter() - self.started, state.global_step, logs["loss"]))


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

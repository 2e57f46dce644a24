"""Data-parallel runs: which process this is.

`torchrun`, `accelerate launch` and `deepspeed` set RANK / WORLD_SIZE for every process they
start; the Trainer then runs data-parallel through accelerate. Work done once (saving the
model, printing results) is rank 0's. Every rank makes the same STS decisions without talking
to the others: skips and token selections are pure functions of (seed, step, micro-batch).
"""

from __future__ import annotations

import logging
import os


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def launched() -> bool:
    """Started by a launcher (torchrun, accelerate launch, deepspeed), even as its only process: an
    engine (FSDP, ZeRO) then runs on one GPU too."""
    return "WORLD_SIZE" in os.environ


def is_main() -> bool:
    return rank() == 0


def label_logs_with_rank() -> None:
    """In a run of several processes, start each log line with the rank that wrote it."""
    if world_size() == 1:
        return
    from transformers.utils import logging as hf_logging

    layout = f"[rank {rank()}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(format=layout)  # sts's own loggers
    for handler in hf_logging.get_logger().handlers:  # transformers' loggers do not propagate
        handler.setFormatter(logging.Formatter(layout))

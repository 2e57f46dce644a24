"""Proportional attention's two paths on a trained model: one training step's loss and gradients
with the key bias in a head dimension (SDPA) against the 4-D float mask (eager attention).

The tests compare them on freshly initialised models; this compares them where training has
taken the weights, e.g. a demo run's model after instruction tuning:

    python benchmarks/key_bias_equivalence.py runs/demo/sts-max/seed-0/instruct/model runs/demo/data/train.json
"""

from __future__ import annotations

import argparse

import torch

import sts
from sts.adapters import get_adapter
from sts.cli.checkpoints import load_model_and_processor
from sts.cli.data.collate import Collator
from sts.cli.data.dataset import LlavaDataset

POOL = {"vtc": {"strategy": "pool", "keep_ratio": 0.25, "proportional_attention": True}}


def one_step(folder: str, data: str, samples: int, attention: str) -> tuple[torch.Tensor, dict]:
    model, processor = load_model_and_processor(folder)
    model.set_attn_implementation(attention)
    get_adapter(model.train()).set_trainable({"vision_tower": "frozen", "projector": "full", "language_model": "full"})
    sts.apply_sts(model, POOL)
    sts.set_progress(model, 0, 10)
    dataset = LlavaDataset(data, processor)
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(samples)])
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a trained checkpoint folder")
    parser.add_argument("data", help="a LLaVA-format JSON file it trained on")
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    mask_loss, mask_grads = one_step(args.model, args.data, args.samples, "eager")
    bias_loss, bias_grads = one_step(args.model, args.data, args.samples, "sdpa")
    worst = max(float((bias_grads[n] - g).norm() / g.norm()) for n, g in mask_grads.items() if g.norm() > 0)
    print(f"loss: 4-D mask {float(mask_loss):.8f}, key bias {float(bias_loss):.8f}")
    print(f"largest gradient difference, relative to its norm: {worst:.2e}")


if __name__ == "__main__":
    main()

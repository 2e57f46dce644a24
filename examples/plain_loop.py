"""STS in a plain PyTorch loop: `sts.apply_sts`, then `sts.set_progress` every optimizer step.

    python examples/plain_loop.py [--model LOCAL_CHECKPOINT] [--data LLAVA.json] [--steps 20]

With accelerate, the same loop works after `accelerator.prepare(...)`: call `set_progress`
on the unwrapped model (`accelerator.unwrap_model(model)`).
"""

import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForImageTextToText, AutoProcessor

import sts
from _tiny import arguments, model_and_data
from sts.cli.data.collate import Collator
from sts.cli.data.dataset import LlavaDataset


def main(argv=None):
    parser = arguments(__doc__)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, data = model_and_data(args.model, args.data, Path(tmp))
        model = AutoModelForImageTextToText.from_pretrained(model_path).train()
        processor = AutoProcessor.from_pretrained(model_path)
        loader = DataLoader(
            LlavaDataset(data, processor),
            batch_size=8,
            shuffle=True,
            collate_fn=Collator(processor.tokenizer.pad_token_id),
        )

        sts.apply_sts(model, {"lds": {"alpha": 0.5, "epsilon": 0.5}})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        stats, batches = [], iter(loader)
        for step in range(args.steps):
            sts.set_progress(model, step, args.steps)
            batch = next(batches, None) or next(batches := iter(loader))
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            stats.append(sts.step_stats(model))
        sts.remove_sts(model)
    return stats


if __name__ == "__main__":
    for step, stat in enumerate(main()):
        print(step, stat)

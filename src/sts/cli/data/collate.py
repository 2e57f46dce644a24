"""Batches of encoded samples, padded on the right."""

from __future__ import annotations

import torch

from sts.cut import IGNORE_INDEX


class Collator:
    """Right-pads ids (pad token) and labels (ignored); concatenates image inputs."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(s["input_ids"]) for s in samples)
        batch = {
            "input_ids": torch.full((len(samples), length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(samples), length), dtype=torch.long),
        }
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            batch["input_ids"][row, :n] = sample["input_ids"]
            batch["labels"][row, :n] = sample["labels"]
            batch["attention_mask"][row, :n] = 1
        for key in sorted({k for s in samples for k in s} - set(batch)):
            present = [s for s in samples if key in s]
            if all(s[key].dim() == 1 and len(s[key]) == len(s["input_ids"]) for s in present):
                batch[key] = torch.zeros((len(samples), length), dtype=present[0][key].dtype)  # per token: padded
                for row, sample in enumerate(samples):
                    if key in sample:
                        batch[key][row, : len(sample[key])] = sample[key]
            else:
                batch[key] = torch.cat([s[key] for s in present])  # per image: concatenated
        return batch

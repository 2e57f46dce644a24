"""The protocol every architecture adapter fills: where a model's parts are and how its
visual tokens are produced, so that STS itself never names a model's attributes."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

PARTS = ("vision_tower", "projector", "language_model")


class Adapter:
    architecture: str = ""
    image_input_keys: tuple[str, ...] = ("pixel_values",)  # inputs consumed by image_features

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ == cls.architecture

    def part(self, name: str) -> list[nn.Module]:
        """The modules that make up one of PARTS."""
        raise NotImplementedError

    def set_trainable(self, modes: dict[str, str]) -> None:
        """modes: part -> 'frozen' | 'full'."""
        for name in PARTS:
            for module in self.part(name):
                module.requires_grad_(modes[name] == "full")

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; image placeholders get a harmless id (they are overwritten)."""
        safe = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return self.model.get_input_embeddings()(safe)

    def special_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        text = self.model.config.get_text_config()
        special = [t for t in (text.bos_token_id, text.eos_token_id, text.pad_token_id) if t is not None]
        return torch.isin(input_ids, torch.tensor(special, device=input_ids.device))

    def image_features(self, inputs: dict) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Each image's projected tokens [n, d] (in sequence order) and their (rows, cols) grid."""
        raise NotImplementedError

    def decoder_layers(self) -> tuple[nn.Module, str]:
        """The module holding the language model's decoder layers and the ModuleList's name."""
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        owner, name = self.decoder_layers()
        return len(getattr(owner, name))

    @contextmanager
    def without_layers(self, skipped: list[int]):
        """Run the language model with the skipped layers absent: never called, so no forward,
        no backward, no activations, no hooks (FSDP / ZeRO-3 never gather them)."""
        owner, name = self.decoder_layers()
        every = getattr(owner, name)
        setattr(owner, name, nn.ModuleList(layer for i, layer in enumerate(every) if i not in skipped))
        try:
            yield
        finally:
            setattr(owner, name, every)

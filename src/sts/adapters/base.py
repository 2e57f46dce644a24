"""The protocol every architecture adapter fills: where a model's parts are."""

from __future__ import annotations

from torch import nn

PARTS = ("vision_tower", "projector", "language_model")


class Adapter:
    architecture: str = ""

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

"""The protocol every architecture adapter fills, so that STS itself never names a model's
attributes: where the parts are, which tokens are visual and how each image's tokens lie on
a grid, which language-model inputs travel with the visual tokens, where the decoder layers are.

How STS uses it: the model runs its own forward. STS reads each image's projected features as
the model's own feature method returns them (`Modality.method`), and cuts the sequence where
the language model receives it (a forward pre-hook on `language_model()`): the embeddings with
the image features already in place, the attention mask, the 1-D or 3-D position ids the model
computed for the full sequence, and the adapter's `sequence_kwargs` / `visual_row_kwargs`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sts.compat import returns_tuple

PARTS = ("vision_tower", "projector", "language_model")


@dataclass
class Modality:
    """Visual tokens of one kind: their placeholder id in `input_ids`, the model's method (on
    `feature_owner()`) that returns their projected features, one tensor per image, and the input
    with one row per image (its length counts them without reading a tensor's values)."""

    name: str  # "image" | "video"
    token_id: int
    method: str
    counted_by: str


@dataclass
class Unit:
    """What the compressor sees at once: `size` consecutive placeholder tokens of one modality.
    Of these, `candidates` (indices into the unit, row-major over `grid`; None: all) are on a
    rows x cols grid and may be dropped or pooled; the others (e.g. row-end newlines) are kept.
    `tiles`: a finer view of an image that another unit shows whole (anyres tiles).
    `row_ends`: the indices of the tokens that close each of the grid's rows (anyres newlines), if any."""

    size: int
    grid: tuple[int, int]
    candidates: torch.Tensor | None = None
    tiles: bool = False
    row_ends: torch.Tensor | None = None


class StandIn(nn.Module):
    """Takes a decoder layer's place in the layer list for one forward. It answers for the layer it
    replaces (attributes the model reads of it, such as `attention_type`), which is not its
    submodule: it is never saved, and state-dict keys never change."""

    def __init__(self, replaced: nn.Module):
        super().__init__()
        object.__setattr__(self, "replaced", replaced)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "replaced"), name)


class SkippedLayer(StandIn):
    """Stands in for a skipped decoder layer for one step: returns its input hidden states, so
    whatever the model does around each layer (DeepStack, per-layer attention types, sliding
    windows, indexed by the layer's place) happens as it would with that layer as an identity,
    and returns what that layer returns: the tensor, or a tuple led by it."""

    def __init__(self, replaced: nn.Module):
        super().__init__(replaced)
        self.as_tuple = returns_tuple(replaced)

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class Adapter:
    architectures: tuple[str, ...] = ()  # model class names this adapter serves
    sequence_kwargs: tuple[str, ...] = ()  # language-model inputs of shape [B, L] besides the mask
    visual_row_kwargs: dict[str, str] = {}  # input with one row per visual position -> its [B, L] mask input

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.architectures

    def part(self, name: str) -> list[nn.Module]:
        """The modules that make up one of PARTS."""
        raise NotImplementedError

    def set_trainable(self, modes: dict[str, str]) -> None:
        """modes: part -> 'frozen' | 'full'."""
        for name in PARTS:
            for module in self.part(name):
                module.requires_grad_(modes[name] == "full")

    def feature_owner(self) -> nn.Module:
        """The module whose `Modality.method`s compute visual features."""
        return self.model.model

    def language_model(self) -> nn.Module:
        """The decoder stack: it receives the sequence (embeddings, mask, positions) as kwargs."""
        return self.model.model.language_model

    def modalities(self) -> list[Modality]:
        return [Modality("image", self.model.config.image_token_id, "get_image_features", "pixel_values")]

    def images_in(self, inputs: dict) -> int:
        """The images (and videos) of a batch, from its inputs' shapes: no device sync, no feature."""
        return sum(len(inputs[m.counted_by]) for m in self.modalities() if inputs.get(m.counted_by) is not None)

    def tower_images_in(self, inputs: dict) -> int:
        """The views the vision tower encodes for a batch (what its cost counts): one an image here."""
        return self.images_in(inputs)

    def units(self, modality: str, features: list[torch.Tensor], inputs: dict) -> list[Unit]:
        """The units of every image (or video) of the batch in order, from its projected
        features as the model computed them and the batch's inputs. Default: one square grid."""
        return [Unit(len(f), square_grid(len(f))) for f in features]

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True where `input_ids` holds a placeholder of any modality's tokens."""
        ids = torch.tensor([modality.token_id for modality in self.modalities()], device=input_ids.device)
        return torch.isin(input_ids, ids)

    def special_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        text = self.model.config.get_text_config()
        special = [t for t in (text.bos_token_id, text.eos_token_id, text.pad_token_id) if t is not None]
        return torch.isin(input_ids, torch.tensor(special, device=input_ids.device))

    def attention(self) -> str:
        """The language model's attention implementation (eager, sdpa, flash_attention_2, ...)."""
        return self.model.config.get_text_config()._attn_implementation

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model().layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @contextmanager
    def without_layers(self, skipped: list[int]):
        """Run the language model with the skipped layers replaced by `SkippedLayer`: they are
        never called, so no forward, no backward, no activations, no hooks (FSDP / ZeRO-3 never
        gather them); the layer list keeps its length, so per-layer wiring is untouched."""
        with standing_in(self.decoder_layers(), skipped, lambda index, layer: SkippedLayer(layer)):
            yield


@contextmanager
def standing_in(layers: nn.ModuleList, indices, stand_in):
    """For one forward, `layers[i]` is `stand_in(i, layers[i])` for each i in `indices`; then the
    layers are put back, whatever happened."""
    originals = {i: layers[i] for i in indices}
    for i, layer in originals.items():
        layers[i] = stand_in(i, layer)
    try:
        yield
    finally:
        for i, layer in originals.items():
            layers[i] = layer


def square_grid(tokens: int) -> tuple[int, int]:
    """(side, side) for a square count, else one row."""
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else (1, tokens)

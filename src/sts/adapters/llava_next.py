"""transformers' LLaVA-NeXT and LLaVA-OneVision: anyres images with `image_newline` tokens.

An image is seen whole at one tile's resolution (the base view) and as a grid of tiles. Its
tokens are the base grid, (image_size / patch)^2 row-major, then the tiles' tokens stitched into
one grid, unpadded to the image's aspect ratio (OneVision: shrunk bilinearly when over
`anyres_max_N` tiles), with one newline token at the end of each row. An image seen as one crop
(OneVision's multi-image samples) is the base grid then one newline.

Units: the base grid, and the tile grid whose newlines are never candidates: they are few, and
they tell the language model where rows end, as at inference (`vtc.merge_newlines` merges those of
rows pooled together). The tile grid is read from the features themselves (rows = its newline
tokens), so it follows whatever unpadding, interpolation and pinpoints the model used.

OneVision's videos are left uncompressed: only images are a modality here, so video tokens reach
the language model as they are (and `text_guided` does not take them for instruction text).
"""

from __future__ import annotations

import torch

from sts.adapters.base import Adapter, Unit


class LlavaNextAdapter(Adapter):
    architectures = ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")

    def part(self, name: str):
        inner = self.model.model
        return {
            "vision_tower": [inner.vision_tower],
            # image_newline is a visual token the language model reads, made with the projector and
            # randomly initialised with it: alignment (projector trained, LLM frozen) must train it.
            "projector": [inner.multi_modal_projector, inner.image_newline],
            "language_model": [inner.language_model, self.model.lm_head],
        }[name]

    def special_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        video = getattr(self.model.config, "video_token_id", None)
        mask = super().special_token_mask(input_ids)
        return mask if video is None else mask | (input_ids == video)

    def tower_images_in(self, inputs: dict) -> int:
        """An image's base view and tiles, as the processor stacks them: (images, views, 3, h, w).
        Images of other aspect ratios are padded to the batch's most views, so this counts the
        padding views too (the tower skips them), but reads no tensor's values."""
        pixels = inputs.get("pixel_values")
        if pixels is None:
            return 0
        return pixels.shape[0] * (pixels.shape[1] if pixels.dim() == 5 else 1)

    def units(self, modality: str, features: list[torch.Tensor], inputs: dict) -> list[Unit]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        newline = self.model.model.image_newline
        return [unit for image in features for unit in anyres_units(image, side, newline.to(image))]


def anyres_units(features: torch.Tensor, side: int, newline: torch.Tensor) -> list[Unit]:
    """The units of one image's packed features [n, d]: a side x side base grid, then one newline
    (a single crop) or rows of tiles each ending in a newline."""
    base = side * side
    tiles = features[base:]
    is_newline = (tiles == newline).all(-1).cpu()
    rows = int(is_newline.sum())
    cols = len(tiles) // rows - 1 if rows else 0
    layout = torch.arange(len(tiles)) % (cols + 1) == cols
    fits = rows > 0 and len(tiles) == rows * (cols + 1) and (cols > 0 or rows == 1)
    if not (fits and torch.equal(is_newline, layout)):
        raise ValueError(
            f"sts: an image's {len(features)} features are not a {side} x {side} base grid followed "
            "by rows of tiles each ending in image_newline, as LLaVA-NeXT / OneVision pack them"
        )
    if cols == 0:
        return [Unit(base + 1, (side, side), torch.arange(base))]
    candidates, row_ends = (~is_newline).nonzero().flatten(), is_newline.nonzero().flatten()
    return [Unit(base, (side, side)), Unit(len(tiles), (rows, cols), candidates, tiles=True, row_ends=row_ends)]

"""transformers' LlavaForConditionalGeneration: the tiny embedded model and real LLaVA-1.5 checkpoints.

Each image is one square grid of patches (576 = 24 x 24 for CLIP-L/336), one token per patch.
"""

from __future__ import annotations

from sts.adapters.base import Adapter


class LlavaAdapter(Adapter):
    architectures = ("LlavaForConditionalGeneration",)

    def part(self, name: str):
        inner = self.model.model
        return {
            "vision_tower": [inner.vision_tower],
            "projector": [inner.multi_modal_projector],
            "language_model": [inner.language_model, self.model.lm_head],
        }[name]

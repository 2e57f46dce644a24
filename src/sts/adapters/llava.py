"""transformers' LlavaForConditionalGeneration: the tiny embedded model and real LLaVA checkpoints."""

from __future__ import annotations

from sts.adapters.base import Adapter


class LlavaAdapter(Adapter):
    architecture = "LlavaForConditionalGeneration"

    def part(self, name: str):
        inner = self.model.model
        return {
            "vision_tower": [inner.vision_tower],
            "projector": [inner.multi_modal_projector],
            "language_model": [inner.language_model, self.model.lm_head],
        }[name]

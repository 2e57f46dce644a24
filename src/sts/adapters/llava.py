"""transformers' LlavaForConditionalGeneration: the tiny embedded model and real LLaVA checkpoints."""

from __future__ import annotations

import math

from sts.adapters.base import Adapter


class LlavaAdapter(Adapter):
    architecture = "LlavaForConditionalGeneration"
    image_input_keys = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    def part(self, name: str):
        inner = self.model.model
        return {
            "vision_tower": [inner.vision_tower],
            "projector": [inner.multi_modal_projector],
            "language_model": [inner.language_model, self.model.lm_head],
        }[name]

    def decoder_layers(self):
        return self.model.model.language_model, "layers"

    def image_features(self, inputs: dict):
        config = self.model.config
        layer = inputs.get("vision_feature_layer")
        strategy = inputs.get("vision_feature_select_strategy")
        features = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=config.vision_feature_layer if layer is None else layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy if strategy is None else strategy,
            image_sizes=inputs.get("image_sizes"),
        )
        result = []
        for image in features:
            side = math.isqrt(len(image))
            grid = (side, side) if side * side == len(image) else (1, len(image))
            result.append((image, grid))
        return result

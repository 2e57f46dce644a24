"""transformers' Qwen2-VL and Qwen2.5-VL: dynamic resolution, M-RoPE, images and videos.

An image of `image_grid_thw` (t, h, w) patches becomes t x (h/m) x (w/m) tokens after the
merger (m = spatial_merge_size): one unit of (h/m) x (w/m) tokens per temporal group, so a video
is compressed frame group by frame group, like a sequence of images. The model computes the
3-D (t, h, w) position ids of the full sequence itself; STS cuts them with the tokens, so kept
tokens keep their positions and the text after an image keeps the positions it has at inference.
The vision tower's merger is the projector.
"""

from __future__ import annotations

import torch

from sts.adapters.base import Adapter, Modality, Unit

PROJECTORS = ("merger", "deepstack_merger_list")


class QwenVLAdapter(Adapter):
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")

    def part(self, name: str):
        visual = self.model.model.visual
        return {
            "vision_tower": [m for n, m in visual.named_children() if n not in PROJECTORS],
            "projector": [m for n, m in visual.named_children() if n in PROJECTORS],
            "language_model": [self.model.model.language_model, self.model.lm_head],
        }[name]

    def modalities(self) -> list[Modality]:
        config = self.model.config
        return [
            Modality("image", config.image_token_id, "get_image_features", "image_grid_thw"),
            Modality("video", config.video_token_id, "get_video_features", "video_grid_thw"),
        ]

    def units(self, modality: str, features: list[torch.Tensor], inputs: dict) -> list[Unit]:
        grids = inputs.get("image_grid_thw" if modality == "image" else "video_grid_thw")
        if grids is None:
            return []
        merge = self.model.config.vision_config.spatial_merge_size
        return [
            Unit(int(h // merge) * int(w // merge), (int(h // merge), int(w // merge)))
            for t, h, w in grids.tolist()
            for _ in range(int(t))
        ]

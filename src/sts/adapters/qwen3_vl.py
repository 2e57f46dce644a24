"""transformers' Qwen3-VL: Qwen2-VL's layout plus DeepStack.

DeepStack adds visual features from the vision tower's middle layers into the first decoder
layers' hidden states at the visual positions (`visual_pos_masks`, `deepstack_visual_embeds`:
one row per visual token). STS cuts those rows with the same selection (pooled alike), and a
skipped layer is an identity in place, so the features still enter after the layer they belong to.
"""

from __future__ import annotations

from sts.adapters.qwen_vl import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    architectures = ("Qwen3VLForConditionalGeneration",)
    sequence_kwargs = ("visual_pos_masks",)
    visual_row_kwargs = {"deepstack_visual_embeds": "visual_pos_masks"}

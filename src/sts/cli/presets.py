"""Model shapes and data lengths of the trainings sts is measured against, built from configs
with random weights (no hub): `sts bench` times them, the demo's FLOPs are scaled to them."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config

from sts.cli.models import tiny
from sts.cli.recipes import TinyModelConfig

# LLaVA-1.5's two stages: (samples, mean text tokens per sample beside its 576 visual tokens):
# LCS-558K's short captions, then mix665k's multi-turn conversations.
LLAVA_15_DATA = {"align": (558_000, 43), "instruct": (665_000, 247)}


def clip_l_336() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )


def llava_15(text, image_token: int) -> LlavaConfig:
    """LLaVA-1.5's shape around a language model: CLIP-L/336 (576 tokens an image, its second-to-last layer)."""
    return LlavaConfig(
        vision_config=clip_l_336(),
        text_config=text,
        image_token_index=image_token,
        vision_feature_layer=-2,
        image_seq_length=576,
    )


def preset_config(name: str, layers: int | None) -> tuple[LlavaConfig, dict]:
    """(config, text tokens per sample in each stage) of a preset; `layers` overrides the decoder depth."""
    llava_text = {stage: text for stage, (_, text) in LLAVA_15_DATA.items()}
    if name == "tiny":
        return tiny.build_config(TinyModelConfig()), {"align": 66, "instruct": 66}
    if name == "llava-1.5-7b":
        text = LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            num_hidden_layers=layers or 32,
            vocab_size=32064,
            max_position_embeddings=4096,
        )
        return llava_15(text, image_token=32000), llava_text
    if name == "llava-1.5-0.5b":
        text = Qwen2Config(
            hidden_size=896,
            intermediate_size=4864,
            num_attention_heads=14,
            num_key_value_heads=2,
            num_hidden_layers=layers or 24,
            vocab_size=151936,
            max_position_embeddings=4096,
        )
        return llava_15(text, image_token=151646), llava_text
    raise ValueError(f"unknown preset {name!r}; choose tiny, llava-1.5-7b or llava-1.5-0.5b")

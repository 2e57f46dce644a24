"""Model shapes and data lengths of the trainings sts is measured against, built from configs
with random weights (no hub): `sts bench` times them, the demo's FLOPs are scaled to them."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    PretrainedConfig,
    Qwen2_5_VLConfig,
    Qwen2Config,
)

from sts.cli.flops import ImageGeometry
from sts.cli.models import families, tiny
from sts.cli.recipes import TinyModelConfig

# LLaVA-1.5's two stages: (samples, mean text tokens per sample beside its 576 visual tokens):
# LCS-558K's short captions, then mix665k's multi-turn conversations.
LLAVA_15_DATA = {"align": (558_000, 43), "instruct": (665_000, 247)}
LLAVA_15_TEXT = {stage: text for stage, (_, text) in LLAVA_15_DATA.items()}
# LLaVA-NeXT-7B's two stages as its public reproduction (Open-LLaVA-NeXT's scripts) trains them:
# anyres in both, LCS-558K, then a 1M-sample mix; its text lengths assumed LLaVA-1.5's.
LLAVA_NEXT_DATA = {"align": (558_000, 43), "instruct": (1_000_000, 247)}
# LLaVA-NeXT's anyres grid: a 336 px base view plus up to 2 x 2 tiles of it (or 1 x 3, 3 x 1).
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@dataclass
class Preset:
    config: PretrainedConfig  # the multimodal model's
    text_tokens: dict[str, int]  # mean text tokens of a sample in each stage
    image: tuple[int, int]  # (height, width) in pixels of every image


def clip_l_336() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )


def vicuna_7b(layers: int | None) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=layers or 32,
        vocab_size=32064,
        max_position_embeddings=4096,
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


def llava_next_7b(layers: int | None) -> LlavaNextConfig:
    """LLaVA-NeXT-7B (Vicuna): CLIP-L/336 on a base view and anyres tiles, newline tokens."""
    return LlavaNextConfig(
        vision_config=clip_l_336(),
        text_config=vicuna_7b(layers),
        image_token_index=32000,
        image_grid_pinpoints=NEXT_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def qwen25_vl_7b(layers: int | None) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct's published widths: a 32-block windowed ViT, a 28-layer Qwen2.5-7B."""
    return Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": layers or 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )


def image_geometry(config, size: tuple[int, int]) -> ImageGeometry:
    """How an image of `size` (height, width) px enters a model of `config`'s family."""
    vision, kind = config.vision_config, type(config).__name__
    height, width = size
    if kind == "LlavaConfig":
        side = vision.image_size // vision.patch_size
        return ImageGeometry(((side, side),))
    if kind == "LlavaNextConfig":
        if [height, width] not in [list(p) for p in config.image_grid_pinpoints]:
            raise ValueError(f"an anyres image must be one of the pinpoints {config.image_grid_pinpoints}")
        tile, side = vision.image_size, vision.image_size // vision.patch_size
        rows, cols = height // tile * side, width // tile * side
        # the base view, then the tiles' grid with a newline closing each of its rows (nothing is
        # unpadded: the image fills its pinpoint)
        return ImageGeometry(((side, side),), tower_images=1 + rows * cols // side**2, tiles=((rows, cols),))
    if hasattr(config, "vision_start_token_id"):  # Qwen-VL: merged patches
        unit = vision.patch_size * vision.spatial_merge_size
        if height % unit or width % unit:
            raise ValueError(f"a Qwen-VL image's sides must be multiples of {unit} px")
        return ImageGeometry(((height // unit, width // unit),))
    raise ValueError(f"no image geometry for {kind}")


PRESETS = {
    "tiny": "the embedded tiny LLaVA",
    "tiny-llava-next": "a toy LLaVA-NeXT (anyres), for a quick look at that family",
    "tiny-qwen2.5-vl": "a toy Qwen2.5-VL (M-RoPE, dynamic resolution)",
    "llava-1.5-7b": "LLaVA-1.5-7B: 576 visual tokens an image",
    "llava-1.5-0.5b": "LLaVA-1.5's vision side on Qwen2-0.5B",
    "llava-next-7b": "LLaVA-NeXT-7B, 672 x 672 images: a base view and 2 x 2 tiles, 2,928 visual tokens",
    "qwen2.5-vl-7b": "Qwen2.5-VL-7B, COCO-sized 644 x 476 images: 391 visual tokens",
}


def preset(name: str, layers: int | None = None) -> Preset:
    """A preset by name; `layers` overrides the decoder depth of the 7B-class ones. Text lengths are
    LLaVA-1.5's stages' (LLaVA-NeXT's and Qwen2.5-VL's instruction data reuse mix665k at their core)."""
    if name == "tiny":
        cfg = TinyModelConfig()
        return Preset(tiny.build_config(cfg), {"align": 66, "instruct": 66}, (cfg.image_size, cfg.image_size))
    if name == "tiny-llava-next":
        return Preset(families.build("LlavaNextForConditionalGeneration")[0], {"align": 20, "instruct": 60}, (64, 64))
    if name == "tiny-qwen2.5-vl":
        side = 8 * families.PATCH
        return Preset(
            families.build("Qwen2_5_VLForConditionalGeneration")[0], {"align": 20, "instruct": 60}, (side, side)
        )
    if name == "llava-1.5-7b":
        return Preset(llava_15(vicuna_7b(layers), image_token=32000), LLAVA_15_TEXT, (336, 336))
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
        return Preset(llava_15(text, image_token=151646), LLAVA_15_TEXT, (336, 336))
    if name == "llava-next-7b":
        return Preset(llava_next_7b(layers), LLAVA_15_TEXT, (672, 672))
    if name == "qwen2.5-vl-7b":
        return Preset(qwen25_vl_7b(layers), LLAVA_15_TEXT, (476, 644))
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")

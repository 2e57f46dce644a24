"""Tiny random-weight models of every supported family, with real processors, built from configs.

Nothing comes from a hub: each family's config is its transformers config class at toy widths,
and its processor is the family's own processor class around a word-level tokenizer (with the
family's special tokens) and a chat template of the family's shape. `save_tiny(name, folder)`
writes a checkpoint folder that `sts train` (`model.path=folder`) and transformers load like a
real one. The tests and examples run on these.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    SiglipVisionConfig,
)

from sts.cli.data.synth import vocabulary
from sts.cli.models.tiny import CHAT_TEMPLATE, build_config, build_processor, llava_next_processor
from sts.compat import pil_image_processor

PATCH = 8
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>"]


def word_tokenizer(specials: list[str], **roles) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the synthetic data's words, the chat words and `specials`."""
    words = ["USER", "ASSISTANT", ":", "user", "assistant", "system"] + vocabulary()
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(WordLevel(vocab, unk_token=specials[0]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()
    named = set(roles.values())
    return PreTrainedTokenizerFast(
        tokenizer_object=core, additional_special_tokens=[s for s in specials if s not in named], **roles
    )


def images_and_text(processor_class, config_class):
    """`processor_class` without its video processor: the families' video processors need
    torchvision, which sts does not depend on. Images and text go through the family's own
    code; registered with AutoProcessor so that a saved checkpoint's processor loads back.
    (transformers saves and loads only the arguments `__init__` names: these are all of them
    for the Qwen processors.)"""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    tiny = type(f"{processor_class.__name__}ImagesOnly", (processor_class,), {"__init__": __init__})
    AutoProcessor.register(config_class, tiny, exist_ok=True)
    return tiny


class LlavaOnevisionProcessorImagesOnly(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor without its video processor, as `images_and_text`, with the
    processor's own arguments named so that they are saved and loaded."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


AutoProcessor.register(LlavaOnevisionConfig, LlavaOnevisionProcessorImagesOnly, exist_ok=True)
QWEN2_VL_PROCESSOR = images_and_text(Qwen2VLProcessor, Qwen2VLConfig)
QWEN2_5_VL_PROCESSOR = images_and_text(Qwen2_5_VLProcessor, Qwen2_5_VLConfig)
QWEN3_VL_PROCESSOR = images_and_text(Qwen3VLProcessor, Qwen3VLConfig)


def qwen_processor(processor_class):
    tokenizer = word_tokenizer(QWEN_SPECIALS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    image_processor = pil_image_processor("Qwen2VLImageProcessor")(
        patch_size=PATCH,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=16 * 16,
        max_pixels=96 * 96,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)


def llava_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(LLAVA_SPECIALS, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def toy_tower(config_class, image_size: int):
    """A vision tower's config (CLIP, SigLIP) at toy widths."""
    return config_class(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=PATCH,
    )


def qwen_ids(tokenizer) -> dict:
    """The Qwen configs' special token ids, as this tokenizer numbers them."""
    return {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in [
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        ]
    }


def build(name: str):
    """(config, processor) of a tiny model of the class `name`, one of FAMILIES."""
    if name not in FAMILIES:
        raise ValueError(f"no tiny model of {name!r}; there are: {', '.join(FAMILIES)}")
    if name == "LlavaForConditionalGeneration":
        return build_config(), build_processor()
    if name in ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"):
        return build_anyres(name)
    processor_class = {
        "Qwen3VLForConditionalGeneration": QWEN3_VL_PROCESSOR,
        "Qwen2_5_VLForConditionalGeneration": QWEN2_5_VL_PROCESSOR,
    }.get(name, QWEN2_VL_PROCESSOR)
    processor = qwen_processor(processor_class)
    tokenizer = processor.tokenizer
    text = {
        **TEXT,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }
    vision = {"depth": 2, "num_heads": 2, "patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if name == "Qwen3VLForConditionalGeneration":
        config = Qwen3VLConfig(
            text_config={
                **text,
                "head_dim": 16,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [2, 3, 3],
                    "mrope_interleaved": True,
                },
            },
            vision_config={
                **vision,
                "hidden_size": 32,
                "intermediate_size": 64,
                "out_hidden_size": 64,
                "num_position_embeddings": 144,
                "deepstack_visual_indexes": [0, 1],
            },
            **qwen_ids(tokenizer),
        )
    else:
        config_class = Qwen2_5_VLConfig if name == "Qwen2_5_VLForConditionalGeneration" else Qwen2VLConfig
        vision_widths = (
            {
                "hidden_size": 32,
                "intermediate_size": 64,
                "out_hidden_size": 64,
                "window_size": 32,
                "fullatt_block_indexes": [1],
            }
            if config_class is Qwen2_5_VLConfig
            else {"embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}
        )
        config = config_class(
            text_config={
                **text,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            },
            vision_config={**vision, **vision_widths},
            **qwen_ids(tokenizer),
        )
    return config, processor


def build_anyres(name: str):
    """LLaVA-NeXT / LLaVA-OneVision at toy widths: 32 px tiles (a 4 x 4 base grid), anyres
    pinpoints up to 2 x 2 tiles, image_newline tokens."""
    tokenizer = llava_tokenizer()
    image_size, pinpoints = 32, [[32, 64], [64, 32], [64, 64]]
    text = LlamaConfig if name == "LlavaNextForConditionalGeneration" else Qwen2Config
    text_config = text(
        **TEXT,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    size = {"height": image_size, "width": image_size}
    if name == "LlavaNextForConditionalGeneration":
        config = LlavaNextConfig(
            vision_config=toy_tower(CLIPVisionConfig, image_size),
            text_config=text_config,
            image_token_index=image_token,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        processor = llava_next_processor(tokenizer, image_size, PATCH, pinpoints, CHAT_TEMPLATE)
    else:
        vision = toy_tower(SiglipVisionConfig, image_size)
        config = LlavaOnevisionConfig(
            vision_config=vision,
            text_config=text_config,
            image_token_index=image_token,
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        image_processor = pil_image_processor("LlavaOnevisionImageProcessor")(
            size=size, image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )

        processor = LlavaOnevisionProcessorImagesOnly(
            image_processor=image_processor,
            tokenizer=tokenizer,
            vision_feature_select_strategy="full",
            chat_template=CHAT_TEMPLATE,
            num_image_tokens=(image_size // PATCH) ** 2,
        )
    return config, processor


def save_tiny(name: str, folder: str | Path, seed: int = 0) -> Path:
    """A tiny random-weight checkpoint of class `name` with its processor, in `folder`."""
    import torch

    config, processor = build(name)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


FAMILIES = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
)
